"""EIP-712 typed data, once: the message shape, its digest, its signature and who signed it.

Two messages of the project are EIP-712 typed data: the client's payment voucher (``ledger._vouchers``, checked on
chain by ``PaymentChannels``) and the verifier's epoch seed (``verifier._epoch``, checked by anyone reading the
evidence). Both sign under a domain of ``{name, version, chainId, verifyingContract}`` and both must refuse exactly
the signatures OpenZeppelin's ``ECDSA.tryRecover`` refuses: a second accepted form of one signature (the malleated
``(r, n - s)`` twin) would be a second valid voucher for the same payment, or a second seed for the verifier to choose
from. This module is the one place that encodes, signs and recovers them, through eth-account's public typed-data
encoder (``encode_typed_data``), so the two cannot drift apart.

Signatures are 65 bytes ``r || s || v`` and never appear in error text: a reason names what is wrong, not the bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from eth_account import Account
from eth_account.messages import SignableMessage, encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_keys.exceptions import BadSignature
from eth_typing import ChecksumAddress
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from eth_utils.exceptions import ValidationError

#: secp256k1 group order: a signature with ``s > N/2`` is the malleated twin of a canonical one (EIP-2).
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
#: The domain fields both messages use, in EIP-712's order (``EIP712Domain(string name,string version,uint256
#: chainId,address verifyingContract)``, what OpenZeppelin's ``EIP712`` hashes).
DOMAIN_FIELDS: tuple[tuple[str, str], ...] = (
    ("name", "string"),
    ("version", "string"),
    ("chainId", "uint256"),
    ("verifyingContract", "address"),
)


def typed_message(
    *,
    name: str,
    version: str,
    chain_id: int,
    verifying_contract: str,
    primary_type: str,
    fields: Sequence[tuple[str, str]],
    message: Mapping[str, Any],
) -> dict[str, Any]:
    """The full EIP-712 message (``types``, ``primaryType``, ``domain``, ``message``) of one ``primary_type`` struct
    with ``fields`` (``(name, solidity type)`` in declaration order): what ``encode_typed_data(full_message=…)``
    takes. The caller validates the values; this only shapes them."""
    return {
        "types": {
            "EIP712Domain": [{"name": n, "type": t} for n, t in DOMAIN_FIELDS],
            primary_type: [{"name": n, "type": t} for n, t in fields],
        },
        "primaryType": primary_type,
        "domain": {"name": name, "version": version, "chainId": chain_id, "verifyingContract": verifying_contract},
        "message": dict(message),
    }


def _signable(full_message: Mapping[str, Any]) -> SignableMessage:
    return encode_typed_data(full_message=dict(full_message))


def typed_digest(full_message: Mapping[str, Any]) -> bytes:
    """``keccak256(0x19 0x01 || domainSeparator || structHash)``: the 32 bytes a signature covers (what a contract's
    ``_hashTypedDataV4`` returns)."""
    signable = _signable(full_message)
    return bytes(keccak(b"\x19" + signable.version + signable.header + signable.body))


def sign_typed(account: LocalAccount, full_message: Mapping[str, Any]) -> bytes:
    """``account``'s 65-byte signature ``r || s || v`` over ``full_message``: deterministic (RFC 6979, so signing
    again gives the same bytes), low ``s`` and ``v`` in {27, 28} as eth-account emits them."""
    return bytes(account.sign_message(_signable(full_message)).signature)


def signature_flaw(signature: bytes) -> str | None:
    """Why ``ECDSA.tryRecover`` would refuse ``signature`` before recovering anything (None: it is canonical).

    Checked in this order, each reason a stable phrase: the length, ``v`` in {27, 28}, a low non-zero ``s``
    (EIP-2), ``r`` in ``(0, N)``.
    """
    if not isinstance(signature, bytes) or len(signature) != 65:
        return "not 65 bytes r || s || v"
    r, s, v = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:64], "big"), signature[64]
    if v not in (27, 28):
        return "v must be 27 or 28"
    if not 0 < s <= SECP256K1_N // 2:
        return "s is not canonical (EIP-2 low s)"
    if not 0 < r < SECP256K1_N:
        return "not a valid signature (r out of range)"
    return None


def recover_typed_signer(full_message: Mapping[str, Any], signature: bytes) -> ChecksumAddress | None:
    """Who signed ``full_message``, as ``ECDSA.tryRecover`` sees it: None for a signature it would refuse (see
    :func:`signature_flaw`) or from which no key can be recovered."""
    if signature_flaw(signature) is not None:
        return None
    try:
        return to_checksum_address(Account.recover_message(_signable(full_message), signature=signature))
    except (BadSignature, ValidationError, ValueError, TypeError):
        # BadSignature is not a ValueError: an ``r`` that is no curve point's x (half of all values) raised it out
        # of here before, where the contract's ``tryRecover`` just answers "no signer".
        return None
