"""Value parsing at the chain layer's edge: ETH amounts, roles, model ids, addresses."""

from __future__ import annotations

import pytest
from eth_utils.crypto import keccak

from ledger import InvalidChainInput, Role, checksum, format_eth, model_id, parse_eth
from planetserve import ModelId


@pytest.mark.parametrize(
    ("text", "wei"),
    [
        ("1", 10**18),
        ("0.1", 10**17),
        ("1.5", 15 * 10**17),
        ("0.000000000000000001", 1),
        ("0", 0),
        ("123456789", 123456789 * 10**18),
    ],
)
def test_parse_eth_is_exact(text: str, wei: int) -> None:
    assert parse_eth(text) == wei
    assert parse_eth(format_eth(wei)) == wei


@pytest.mark.parametrize("text", ["-1", "abc", "NaN", "inf", "0.0000000000000000001", ""])
def test_parse_eth_rejects_bad_amounts(text: str) -> None:
    with pytest.raises(InvalidChainInput) as exc:
        parse_eth(text, param="stake")
    assert exc.value.param == "stake" and exc.value.code.startswith("invalid")


def test_role_parse_accepts_names_and_rejects_others() -> None:
    assert (
        Role.parse("Model") is Role.MODEL
        and Role.parse("relay") is Role.RELAY
        and Role.parse("VERIFIER") is Role.VERIFIER
    )
    with pytest.raises(InvalidChainInput) as exc:
        Role.parse("miner")
    assert exc.value.param == "role" and "model, relay, verifier" in str(exc.value)


def test_model_id_is_keccak_of_name_at_revision() -> None:
    assert model_id("tiny-llama@v1").to_bytes() == keccak(text="tiny-llama@v1")
    assert model_id("tiny-llama@v1") == ModelId.of("tiny-llama@v1") == "0x" + keccak(text="tiny-llama@v1").hex()
    for bad in ("tiny-llama", "@v1", "a@", "a b@v1", "x@y@z"):
        with pytest.raises(InvalidChainInput):
            model_id(bad)


def test_checksum_normalises_and_rejects() -> None:
    lower = "0xf39fd6e51aad88f6f4ce6ab8827279cfffb92266"
    assert checksum(lower) == "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
    with pytest.raises(InvalidChainInput):
        checksum("0x1234")
