"""Regenerate ``tests/vectors/vouchers.json`` from first principles: ``eth_abi`` + keccak + ``eth_keys``.

Deliberately independent of ``ledger._vouchers`` (which goes through eth-account's typed-data encoder), so the
vectors check that code rather than echo it. Run: ``.venv/bin/python tests/vectors/generate_vouchers.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from eth_abi.abi import encode
from eth_account import Account
from eth_keys.datatypes import PrivateKey
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

DOMAIN_TYPE = "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
VOUCHER_TYPE = "Voucher(uint256 channelId,uint256 cumulativeAmount)"
NAME, VERSION = "PlanetServe PaymentChannels", "1"
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
#: anvil's public development mnemonic; account 10 signs (a test key, never a real one).
DEV_MNEMONIC = "test test test test test test test test test test test junk"
INPUTS = [
    (31337, "0x5fbdb2315678afecb367f032d93f642f64180aa3", 1, 1),
    (31337, "0x5fbdb2315678afecb367f032d93f642f64180aa3", 42, 10**18),
    (1, "0x00000000000000000000000000000000000000ff", 2**256 - 1, 2**256 - 1),
    (8453, "0xe7f1725e7734ce288f8367e1bb143e90bb3f0512", 7, 0),
]


def _case(key: PrivateKey, chain_id: int, contract: str, channel: int, amount: int) -> dict[str, Any]:
    separator = keccak(
        encode(
            ["bytes32", "bytes32", "bytes32", "uint256", "address"],
            [keccak(text=DOMAIN_TYPE), keccak(text=NAME), keccak(text=VERSION), chain_id, contract],
        )
    )
    struct = keccak(encode(["bytes32", "uint256", "uint256"], [keccak(text=VOUCHER_TYPE), channel, amount]))
    digest = keccak(b"\x19\x01" + separator + struct)
    sig = key.sign_msg_hash(digest)
    rsv = sig.r.to_bytes(32, "big") + sig.s.to_bytes(32, "big") + bytes([sig.v + 27])
    return {
        "chain_id": chain_id,
        "contract": to_checksum_address(contract),
        "channel_id": str(channel),
        "cumulative_amount": str(amount),
        "domain_separator": separator.hex(),
        "struct_hash": struct.hex(),
        "digest": digest.hex(),
        "signature": rsv.hex(),
    }


def main() -> None:
    Account.enable_unaudited_hdwallet_features()
    account = Account.from_mnemonic(DEV_MNEMONIC, account_path="m/44'/60'/0'/0/10")
    key = PrivateKey(bytes(account.key))
    cases = [_case(key, *inputs) for inputs in INPUTS]
    sig = bytes.fromhex(cases[0]["signature"])
    r, s, v = sig[:32], int.from_bytes(sig[32:64], "big"), sig[64]
    reject = [
        {"reason": "high_s", "signature": (r + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - v])).hex()},
        {"reason": "v_not_27_or_28", "signature": (sig[:64] + bytes([1])).hex()},
        {"reason": "r_zero", "signature": (bytes(32) + sig[32:]).hex()},
        {"reason": "s_zero", "signature": (sig[:32] + bytes(32) + sig[64:]).hex()},
    ]
    out = {
        "description": "EIP-712 payment vouchers (docs/payments.md), computed from first principles with eth_abi, "
        "keccak and eth_keys (tests/vectors/generate_vouchers.py); the signer is anvil dev account 10.",
        "signer": account.address,
        "domain_name": NAME,
        "domain_version": VERSION,
        "domain_type": DOMAIN_TYPE,
        "voucher_type": VOUCHER_TYPE,
        "cases": cases,
        "must_reject": {"case": 0, "signatures": reject},
    }
    Path(__file__).with_name("vouchers.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
