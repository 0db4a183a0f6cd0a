"""The kernel's shared value types: one model id, wei amounts, addresses; parsed at the edges, one form inside."""

from __future__ import annotations

import copy
import json
import os
import pickle

import pytest
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from planetserve import (
    InvalidValue,
    ModelId,
    PlanetServeError,
    Wei,
    address_bytes,
    format_eth,
    is_model_name,
    keccak256,
    parse_address,
    parse_eth,
)


def test_keccak256_is_ethereums_keccak_not_sha3() -> None:
    import hashlib

    assert keccak256(b"") == keccak(b"") != hashlib.sha3_256(b"").digest()
    assert keccak256(b"tiny-llama@v1") == keccak(text="tiny-llama@v1")


def test_model_id_of_name_is_the_registry_keccak_in_canonical_hex() -> None:
    mid = ModelId.of("tiny-llama@v1")
    assert mid == "0x" + keccak(text="tiny-llama@v1").hex()
    assert mid.to_bytes() == keccak(text="tiny-llama@v1")
    assert isinstance(mid, str) and len(mid) == 66 and mid == mid.lower()


def test_model_id_round_trips_through_bytes_text_and_json() -> None:
    raw = os.urandom(32)
    mid = ModelId(raw)
    assert ModelId(mid.to_bytes()) == mid == ModelId(str(mid)) == ModelId(mid.upper().replace("0X", "0x"))
    assert ModelId.parse(bytearray(raw)) == mid and ModelId.parse(memoryview(raw)) == mid
    assert ModelId.parse(mid) is mid
    assert json.loads(json.dumps({"model": mid}))["model"] == mid
    keyed: dict[str, int] = {mid: 1}
    assert keyed["0x" + raw.hex()] == 1  # a dict keyed by the canonical text finds it
    assert repr(mid).startswith("ModelId('0x")
    for copied in (copy.deepcopy(mid), pickle.loads(pickle.dumps(mid))):  # dataclasses.asdict deep-copies
        assert type(copied) is ModelId and copied == mid


def test_one_canonical_form_whatever_the_hex_case() -> None:
    upper = "0x" + "AB" * 32
    assert ModelId(upper) == "0x" + "ab" * 32
    assert str(ModelId(upper)) == "0x" + "ab" * 32


def test_zero_model_id_is_what_relays_register() -> None:
    assert ModelId.ZERO == "0x" + "00" * 32 and ModelId.ZERO.to_bytes() == bytes(32)
    assert ModelId.ZERO.is_zero and not ModelId.of("a@b").is_zero


@pytest.mark.parametrize(
    "bad",
    ["", "0x", "ab" * 32, "0x" + "ab" * 31, "0x" + "ab" * 33, "0x" + "zz" * 32, " 0x" + "ab" * 32, bytes(31), 7, None],
)
def test_model_id_rejects_anything_but_the_two_edge_forms(bad: object) -> None:
    with pytest.raises(InvalidValue) as exc:
        ModelId.parse(bad, param="model")
    assert exc.value.param == "model" and exc.value.code == "invalid_input"
    assert isinstance(exc.value, PlanetServeError)


@pytest.mark.parametrize("bad", ["tiny-llama", "@v1", "a@", "a b@v1", "x@y@z", "m@" + "r" * 65, "é@v1"])
def test_model_name_must_be_name_at_revision(bad: str) -> None:
    assert not is_model_name(bad)
    with pytest.raises(InvalidValue) as exc:
        ModelId.of(bad)
    assert exc.value.param == "model"


def test_invalid_value_message_is_bounded() -> None:
    with pytest.raises(InvalidValue) as exc:
        ModelId.parse("x" * 10_000)
    assert len(str(exc.value)) < 200


@pytest.mark.parametrize(
    ("text", "wei"),
    [("1", 10**18), ("0.1", 10**17), ("1.5", 15 * 10**17), ("0.000000000000000001", 1), ("0", 0), (" 2 ", 2 * 10**18)],
)
def test_eth_text_round_trips_exactly(text: str, wei: int) -> None:
    assert parse_eth(text) == wei
    assert parse_eth(format_eth(wei)) == wei


def test_format_eth_keeps_sign_and_drops_trailing_zeros() -> None:
    assert format_eth(Wei(1)) == "0.000000000000000001"
    assert format_eth(-15 * 10**17) == "-1.5"
    assert format_eth(2**256 - 1).startswith("115792089237316195423570985008687907853269984665640564039457")


@pytest.mark.parametrize("bad", ["-1", "abc", "NaN", "inf", "0.0000000000000000001", "", str(2**256), True])
def test_parse_eth_rejects_bad_amounts(bad: object) -> None:
    with pytest.raises(InvalidValue) as exc:
        parse_eth(bad, param="stake")  # type: ignore[arg-type]  # a bool from a careless caller
    assert exc.value.param == "stake"


def test_address_round_trips_bytes_and_checksummed_text() -> None:
    for _ in range(50):
        raw = os.urandom(20)
        addr = parse_address(raw)
        assert addr == to_checksum_address(raw)
        assert parse_address(addr.lower()) == addr == parse_address("0x" + addr[2:].upper())
        assert address_bytes(addr) == raw
    assert parse_address(bytes(20)) == "0x" + "0" * 40


def test_address_rejects_a_wrong_checksum_and_bad_shapes() -> None:
    good = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
    assert parse_address(good) == good
    wrong = good.replace("F39F", "f39F").replace("0xf39Fd", "0xf39fD")
    with pytest.raises(InvalidValue, match="checksum"):
        parse_address(wrong)
    for bad in ("0x1234", good[2:], good + "00", b"\x01" * 19, 5):
        with pytest.raises(InvalidValue) as exc:
            parse_address(bad, param="operator")
        assert exc.value.param == "operator"


def test_a_bad_kernel_value_is_an_invalid_input_exit_in_the_cli() -> None:
    import ledger
    from cli._main import exit_code_for
    from cli.exit_codes import ExitCode

    assert exit_code_for(InvalidValue("model", "x", "r")) is ExitCode.INVALID_INPUT
    chain = ledger.InvalidChainInput("stake", "x", "r")  # the ledger's leaf is the kernel's error too
    assert isinstance(chain, InvalidValue) and isinstance(chain, ledger.ChainError) and chain.param == "stake"
    with pytest.raises(ledger.InvalidChainInput):
        ledger.model_id("no-revision")
    with pytest.raises(ledger.InvalidChainInput):
        ledger.checksum("0x1234")


def test_the_old_public_names_still_import_and_are_the_kernels() -> None:
    import ledger
    import node.inference

    assert ledger.Wei is Wei and ledger.format_eth is format_eth
    assert ledger.parse_eth("1.5") == parse_eth("1.5")
    assert ledger.checksum("0x" + "ab" * 20) == parse_address("0x" + "ab" * 20)
    assert ledger.model_id("m@v1") == ModelId.of("m@v1") and type(ledger.model_id("m@v1")) is ModelId
    made = node.inference.model_id_for("ps-tiny", "ab" * 20)
    assert type(made) is ModelId and made == ModelId.of("ps-tiny@" + "ab" * 20)
    with pytest.raises(node.inference.InvalidParams):
        node.inference.model_id_for("a name", "r")
