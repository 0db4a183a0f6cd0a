"""Value types of the chain layer: amounts, roles, model ids and the records the handles return."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import NewType

from eth_typing import ChecksumAddress
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from ledger._errors import InvalidChainInput

#: An amount of ether in wei (1 ether = 10**18 wei). Never a float.
Wei = NewType("Wei", int)

_WEI_PER_ETH = 10**18
_MODEL_NAME = re.compile(r"^[A-Za-z0-9._/-]{1,128}@[A-Za-z0-9._-]{1,64}$")


class Role(enum.IntEnum):
    """A node's role; the values are the Solidity enum's."""

    MODEL = 0
    RELAY = 1
    VERIFIER = 2

    @classmethod
    def parse(cls, text: str) -> Role:
        """``model``/``relay``/``verifier`` (any case) to a role, or ``InvalidChainInput(param="role")``."""
        try:
            return cls[text.strip().upper()]
        except KeyError:
            choices = ", ".join(r.name.lower() for r in cls)
            raise InvalidChainInput("role", text, f"unknown role, expected one of {choices}") from None


def parse_eth(text: str | int | Decimal, *, param: str = "amount") -> Wei:
    """An ETH amount (``"1.5"``) to wei, exactly; rejects negatives, NaN and more than 18 decimals."""
    try:
        value = Decimal(str(text).strip())
    except InvalidOperation:
        raise InvalidChainInput(param, text, "not a number of ETH") from None
    if not value.is_finite() or value < 0:
        raise InvalidChainInput(param, text, "must be a non-negative number of ETH")
    wei = value * _WEI_PER_ETH
    if wei != wei.to_integral_value():
        raise InvalidChainInput(param, text, "more than 18 decimal places")
    return Wei(int(wei))


def format_eth(amount: int) -> str:
    """Wei to a plain ETH string without float rounding (``1500000000000000000`` -> ``"1.5"``)."""
    whole, frac = divmod(amount, _WEI_PER_ETH)
    return f"{whole}.{frac:018d}".rstrip("0").rstrip(".") if frac else str(whole)


def checksum(address: str, *, param: str = "address") -> ChecksumAddress:
    """A checksummed address, or ``InvalidChainInput``; every address entering the layer passes here."""
    try:
        return to_checksum_address(address)
    except (ValueError, TypeError):
        raise InvalidChainInput(param, address, "not a 20-byte hex address") from None


def model_id(name_at_revision: str) -> bytes:
    """The on-chain model id: keccak256 of the UTF-8 ``name@revision`` (validated, e.g. ``tiny-llama@v1``)."""
    if not _MODEL_NAME.fullmatch(name_at_revision):
        raise InvalidChainInput("model", name_at_revision, "expected NAME@REVISION, e.g. tiny-llama@v1")
    return keccak(text=name_at_revision)


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeInfo:
    """A node as the registry contract reports it."""

    #: The operator's checksummed address.
    operator: ChecksumAddress
    #: The node's role.
    role: Role
    #: The bonded stake in wei (>= 0).
    stake: Wei
    #: The raw 32-byte X25519 public key used for onion encryption.
    x25519_public_key: bytes
    #: keccak256 of ``name@revision`` (32 bytes); all zero for relays.
    model_id: bytes
    #: Price in wei per 1000 tokens.
    price_per_1k_tokens: Wei
    #: Unix time of registration (seconds).
    registered_at: int
    #: Unix time from which the node may deregister; 0 while bonded.
    unbonding_ends_at: int
    #: The public URL.
    endpoint: str
    #: Whether the node is routed to (bonded, not jailed and at or above its role's minimum stake).
    active: bool
    #: Whether a slash jailed the node and its operator has not called ``unjail`` yet (never routed to meanwhile).
    jailed: bool

    @property
    def unbonding(self) -> bool:
        """Whether the operator requested unbonding (it is no longer routed to)."""
        return self.unbonding_ends_at != 0


@dataclass(frozen=True, slots=True, kw_only=True)
class TxReceipt:
    """The outcome of a successful transaction."""

    #: 0x-prefixed transaction hash.
    tx_hash: str
    #: Block the transaction was mined in.
    block_number: int
    #: Gas used (units of gas, not wei).
    gas_used: int
    #: Effective gas price in wei per gas unit.
    effective_gas_price: Wei
    #: Names of the registry events the transaction emitted, in log order.
    events: tuple[str, ...]
    #: The deployed contract's address, for deployments only.
    contract_address: ChecksumAddress | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class WithdrawalReceipts:
    """What :meth:`ledger.NodeRegistry.deregister_and_withdraw` did: one or two mined transactions."""

    #: The ``deregister`` transaction, or None when the node was already deregistered.
    deregister: TxReceipt | None
    #: The ``withdraw`` transaction.
    withdraw: TxReceipt
    #: Wei paid to the operator by ``withdraw`` (>= 1).
    amount: Wei

    @property
    def receipts(self) -> tuple[TxReceipt, ...]:
        """Every mined transaction, in the order sent."""
        return (self.withdraw,) if self.deregister is None else (self.deregister, self.withdraw)
