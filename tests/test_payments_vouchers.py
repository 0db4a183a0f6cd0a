"""Vouchers signed and verified in Python agree byte for byte with the contract (OpenZeppelin's EIP712/ECDSA)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from eth_utils.crypto import keccak

from ledger import InvalidChainInput, Voucher, VoucherDomain, Wei, dev_account, sign_voucher, verify_voucher
from ledger._vouchers import (
    DOMAIN_NAME,
    DOMAIN_VERSION,
    VOUCHER_TYPE,
    VOUCHER_TYPEHASH,
    VoucherForged,
    VoucherWrongChain,
    VoucherWrongContract,
    recover_voucher_signer,
    voucher_digest,
)
from tests.fixtures.chain import OUTSIDER, ChainEnv
from tests.fixtures.payments import payments

CLIENT = 10
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def _replace_signature(voucher: Voucher, signature: bytes) -> Voucher:
    return Voucher(
        domain=voucher.domain,
        channel_id=voucher.channel_id,
        cumulative_amount=voucher.cumulative_amount,
        signature=signature,
    )


def test_domain_and_type_hash_are_the_contracts(chain: ChainEnv) -> None:
    pay = payments(chain)
    domain = pay.domain()
    assert domain == VoucherDomain(chain_id=chain.w3.eth.chain_id, contract=pay.address)
    assert bytes(pay.contract.functions.VOUCHER_TYPEHASH().call()) == VOUCHER_TYPEHASH
    assert keccak(text="Voucher(uint256 channelId,uint256 cumulativeAmount)") == VOUCHER_TYPEHASH


@pytest.mark.parametrize(
    ("channel_id", "amount"), [(0, 0), (1, 1), (7, 123_456_789_000), (2**255, 2**256 - 1), (2**256 - 1, 2**96)]
)
def test_python_digest_equals_the_contract_digest(chain: ChainEnv, channel_id: int, amount: int) -> None:
    pay = payments(chain)
    assert voucher_digest(pay.domain(), channel_id, amount) == pay.voucher_digest(channel_id, amount)


@pytest.mark.parametrize("amount", [1, 10**18, 2**256 - 1])
def test_a_python_signed_voucher_recovers_to_the_same_signer_on_chain(chain: ChainEnv, amount: int) -> None:
    pay = payments(chain)
    signed = sign_voucher(dev_account(CLIENT), pay.domain(), 5, amount)
    assert signed.digest() == pay.voucher_digest(5, amount)
    client = dev_account(CLIENT).address
    assert recover_voucher_signer(signed) == pay.voucher_signer(signed) == client
    assert verify_voucher(signed, domain=pay.domain(), client=client) == client


def test_signatures_the_contract_refuses_python_refuses_too(chain: ChainEnv) -> None:
    pay = payments(chain)
    good = sign_voucher(dev_account(CLIENT), pay.domain(), 3, 99)
    r, s, v = good.signature[:32], int.from_bytes(good.signature[32:64], "big"), good.signature[64]
    bad = {
        "high_s": r + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - v]),
        "v_29": good.signature[:64] + bytes([29]),
        "v_0": good.signature[:64] + bytes([0]),
        "zero_r": bytes(32) + good.signature[32:],
        "zeros": bytes(65),
        # In range, but no curve point has x = 5 (5**3 + 7 is not a square mod p): ecrecover finds no key, and
        # eth-keys raises BadSignature (not a ValueError), which once escaped recover_voucher_signer.
        "r_not_on_curve": (5).to_bytes(32, "big") + good.signature[32:],
    }
    for name, signature in bad.items():
        voucher = _replace_signature(good, signature)
        assert pay.voucher_signer(voucher) is None, name
        assert recover_voucher_signer(voucher) is None, name
        with pytest.raises(VoucherForged):
            verify_voucher(voucher, domain=pay.domain(), client=dev_account(CLIENT).address)


def test_verify_tells_wrong_chain_and_wrong_contract_from_forgery(chain: ChainEnv) -> None:
    pay = payments(chain)
    here = pay.domain()
    client = dev_account(CLIENT).address
    other_chain = VoucherDomain(chain_id=here.chain_id + 1, contract=here.contract)
    other_contract = VoucherDomain(chain_id=here.chain_id, contract=dev_account(OUTSIDER).address)
    with pytest.raises(VoucherWrongChain) as chain_exc:
        verify_voucher(sign_voucher(dev_account(CLIENT), other_chain, 1, 5), domain=here, client=client)
    assert (chain_exc.value.expected, chain_exc.value.actual, chain_exc.value.code) == (
        here.chain_id,
        here.chain_id + 1,
        "voucher_wrong_chain",
    )
    with pytest.raises(VoucherWrongContract) as contract_exc:
        verify_voucher(sign_voucher(dev_account(CLIENT), other_contract, 1, 5), domain=here, client=client)
    assert contract_exc.value.code == "voucher_wrong_contract"
    with pytest.raises(VoucherForged) as forged:
        verify_voucher(sign_voucher(dev_account(OUTSIDER), here, 1, 5), domain=here, client=client)
    assert forged.value.signer == dev_account(OUTSIDER).address and forged.value.code == "voucher_forged"
    # The handle refuses to spend gas on a voucher for elsewhere.
    with pytest.raises(InvalidChainInput):
        payments(chain, 1).redeem(sign_voucher(dev_account(CLIENT), other_chain, 1, 5))


def test_voucher_json_round_trips_and_parsing_is_strict() -> None:
    domain = VoucherDomain(chain_id=31337, contract=dev_account(3).address)
    voucher = sign_voucher(dev_account(CLIENT), domain, 12, 2**200)
    data = voucher.to_json()
    assert data["cumulativeAmount"] == str(2**200)
    assert Voucher.from_json(data) == voucher
    for field, value in [("channelId", "012"), ("channelId", 12), ("cumulativeAmount", "-1"), ("signature", "ab")]:
        with pytest.raises(InvalidChainInput):
            Voucher.from_json({**data, field: value})
    with pytest.raises(InvalidChainInput):
        Voucher(domain=domain, channel_id=1, cumulative_amount=Wei(2**256), signature=bytes(65))


def test_the_signature_never_appears_in_a_repr_or_error() -> None:
    domain = VoucherDomain(chain_id=31337, contract=dev_account(3).address)
    voucher = sign_voucher(dev_account(CLIENT), domain, 1, 5)
    assert voucher.signature.hex() not in repr(voucher)
    with pytest.raises(VoucherForged) as exc:
        verify_voucher(voucher, domain=domain, client=dev_account(OUTSIDER).address)
    assert voucher.signature.hex() not in str(exc.value)


def _vectors() -> dict[str, Any]:
    content: dict[str, Any] = json.loads((Path(__file__).parent / "vectors" / "vouchers.json").read_text())
    return content


def test_vouchers_reproduce_the_independent_vectors() -> None:
    vectors = _vectors()
    assert (vectors["domain_name"], vectors["domain_version"]) == (DOMAIN_NAME, DOMAIN_VERSION)
    assert vectors["voucher_type"] == VOUCHER_TYPE
    assert vectors["signer"] == dev_account(CLIENT).address
    for case in vectors["cases"]:
        domain = VoucherDomain(chain_id=case["chain_id"], contract=case["contract"])
        channel, amount = int(case["channel_id"]), int(case["cumulative_amount"])
        assert voucher_digest(domain, channel, amount).hex() == case["digest"]
        signed = sign_voucher(dev_account(CLIENT), domain, channel, amount)
        assert signed.signature.hex() == case["signature"]
        assert recover_voucher_signer(signed) == vectors["signer"]


def test_the_must_reject_signature_vectors_are_refused() -> None:
    vectors = _vectors()
    base = vectors["cases"][vectors["must_reject"]["case"]]
    domain = VoucherDomain(chain_id=base["chain_id"], contract=base["contract"])
    reasons = []
    for bad in vectors["must_reject"]["signatures"]:
        voucher = Voucher(
            domain=domain,
            channel_id=int(base["channel_id"]),
            cumulative_amount=Wei(int(base["cumulative_amount"])),
            signature=bytes.fromhex(bad["signature"]),
        )
        assert recover_voucher_signer(voucher) is None, bad["reason"]
        reasons.append(bad["reason"])
    assert reasons == ["high_s", "v_not_27_or_28", "r_zero", "s_zero"]
