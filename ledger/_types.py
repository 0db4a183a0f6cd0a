"""Value types of the chain layer: amounts, roles, model ids and the records the handles return.

Wei, model ids and addresses are the kernel's (:mod:`planetserve`), shared with every layer; the names kept here
(``Wei``, ``parse_eth``, ``format_eth``, ``checksum``, ``model_id``) are the ledger's public spelling of them, raising
the chain layer's ``InvalidChainInput``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from decimal import Decimal

from eth_typing import ChecksumAddress

from ledger._errors import InvalidChainInput
from planetserve import InvalidValue, ModelId, parse_address
from planetserve import Wei as Wei  # re-exported: the ledger's public names
from planetserve import format_eth as format_eth
from planetserve import parse_eth as _parse_eth


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


def _as_chain_input(exc: InvalidValue) -> InvalidChainInput:
    return InvalidChainInput(exc.param, exc.value, exc.reason)


def parse_eth(text: str | int | Decimal, *, param: str = "amount") -> Wei:
    """An ETH amount (``"1.5"``) to wei, exactly (the kernel's :func:`planetserve.parse_eth`)."""
    try:
        return _parse_eth(text, param=param)
    except InvalidValue as exc:
        raise _as_chain_input(exc) from None


def checksum(address: str, *, param: str = "address") -> ChecksumAddress:
    """A checksummed address, or ``InvalidChainInput``; every address entering the layer passes here."""
    try:
        return parse_address(address, param=param)
    except InvalidValue as exc:
        raise _as_chain_input(exc) from None


def model_id(name_at_revision: str) -> ModelId:
    """The on-chain model id of ``name@revision`` (validated, e.g. ``tiny-llama@v1``): :meth:`ModelId.of`."""
    try:
        return ModelId.of(name_at_revision)
    except InvalidValue as exc:
        raise _as_chain_input(exc) from None


_UINT256 = 2**256


def check_uint(value: int, param: str, *, low: int = 0, high: int = _UINT256) -> int:
    """``value`` if it is an integer in ``[low, high)`` (default: a uint256), else ``InvalidChainInput``.

    The handles check every ABI integer here before web3 sees it, so a bad argument is a named error, not web3's.
    """
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value < high:
        shown = "2**256" if high == _UINT256 else str(high)
        raise InvalidChainInput(param, value, f"must be an integer in [{low}, {shown})")
    return value


def check_bytes32(value: bytes, param: str) -> bytes:
    """``value`` if it is exactly 32 bytes (an ABI ``bytes32``), else ``InvalidChainInput``."""
    if not isinstance(value, bytes) or len(value) != 32:
        raise InvalidChainInput(param, value, "must be exactly 32 bytes")
    return value


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
    #: keccak256 of ``name@revision``; :attr:`ModelId.ZERO` for relays.
    model_id: ModelId
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
