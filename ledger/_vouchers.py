"""EIP-712 payment vouchers: build, sign and verify them off chain exactly as ``PaymentChannels`` does on chain.

A voucher is the client's signature over ``Voucher(uint256 channelId,uint256 cumulativeAmount)`` under the
domain ``{name: "PlanetServe PaymentChannels", version: "1", chainId, verifyingContract}``: the total the client
owes on one channel so far. Because it is cumulative, the latest voucher supersedes every earlier one, a lost
voucher costs nothing, and the node redeems once for any number of requests.

Verification here mirrors OpenZeppelin's ``ECDSA.tryRecover``: a 65-byte ``r || s || v`` signature with
``v`` in {27, 28} and a low ``s`` (EIP-2), so a signature the contract refuses is refused here too, and the
recovered signer is the contract's. Signatures never appear in reprs or error text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from eth_utils.crypto import keccak

from ledger._eip712 import recover_typed_signer, sign_typed, typed_digest, typed_message
from ledger._errors import ChainError, InvalidChainInput
from ledger._types import Wei, check_uint, checksum

#: The contract's EIP-712 name and version (``EIP712("PlanetServe PaymentChannels", "1")``).
DOMAIN_NAME = "PlanetServe PaymentChannels"
DOMAIN_VERSION = "1"
#: The primary type, byte for byte as the contract's ``VOUCHER_TYPEHASH`` preimage.
VOUCHER_TYPE = "Voucher(uint256 channelId,uint256 cumulativeAmount)"
#: keccak256 of :data:`VOUCHER_TYPE` (the contract exposes the same value as ``VOUCHER_TYPEHASH``).
VOUCHER_TYPEHASH = keccak(text=VOUCHER_TYPE)
#: The ``Voucher`` struct's fields, in :data:`VOUCHER_TYPE`'s order.
_VOUCHER_FIELDS = (("channelId", "uint256"), ("cumulativeAmount", "uint256"))


@dataclass(frozen=True, slots=True, kw_only=True)
class VoucherDomain:
    """The EIP-712 domain of one deployed ``PaymentChannels``: which chain and which contract a voucher pays on."""

    #: EIP-155 chain id (> 0).
    chain_id: int
    #: The ``PaymentChannels`` address (checksummed on construction).
    contract: ChecksumAddress

    def __post_init__(self) -> None:
        check_uint(self.chain_id, "chain_id", low=1)
        object.__setattr__(self, "contract", checksum(self.contract, param="contract"))


@dataclass(frozen=True, slots=True, kw_only=True)
class Voucher:
    """A signed promise: the client owes ``cumulative_amount`` wei in total on ``channel_id``.

    The chain id and contract travel with the voucher so that a voucher for another chain or contract is told
    apart from a forgery (its signature would be valid there, not here).
    """

    #: Where the voucher pays.
    domain: VoucherDomain
    #: The channel id (>= 1 for a real channel; 0 is never opened).
    channel_id: int
    #: Total owed on the channel, in wei, in [0, 2**256).
    cumulative_amount: Wei
    #: 65 bytes ``r || s || v``; never shown in the repr.
    signature: bytes = field(repr=False)

    def __post_init__(self) -> None:
        check_uint(self.channel_id, "channel_id")
        check_uint(self.cumulative_amount, "cumulative_amount")
        if not isinstance(self.signature, bytes) or len(self.signature) != 65:
            raise InvalidChainInput("signature", "<redacted>", "must be 65 bytes r || s || v")

    def digest(self) -> bytes:
        """The 32-byte EIP-712 digest the signature covers."""
        return voucher_digest(self.domain, self.channel_id, self.cumulative_amount)

    def to_json(self) -> dict[str, Any]:
        """A JSON object with amounts as decimal strings (uint256 does not fit JSON numbers safely)."""
        return {
            "chainId": str(self.domain.chain_id),
            "contract": self.domain.contract,
            "channelId": str(self.channel_id),
            "cumulativeAmount": str(self.cumulative_amount),
            "signature": "0x" + self.signature.hex(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Voucher:
        """Parse :meth:`to_json`'s shape strictly; ``InvalidChainInput`` names the bad field."""
        try:
            signature_hex = str(data["signature"])
            if not signature_hex.startswith("0x"):
                raise ValueError("signature must be 0x-hex")
            return cls(
                domain=VoucherDomain(chain_id=_decimal(data["chainId"]), contract=checksum(str(data["contract"]))),
                channel_id=_decimal(data["channelId"]),
                cumulative_amount=Wei(_decimal(data["cumulativeAmount"])),
                signature=bytes.fromhex(signature_hex[2:]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidChainInput("voucher", "<redacted>", f"malformed voucher JSON ({type(exc).__name__})") from exc


def _decimal(value: object) -> int:
    if not isinstance(value, str) or not value.isdigit() or (len(value) > 1 and value[0] == "0") or len(value) > 78:
        raise ValueError("expected a canonical decimal string")
    return int(value)


def voucher_typed_data(domain: VoucherDomain, channel_id: int, cumulative_amount: int) -> dict[str, Any]:
    """The full EIP-712 message (``types``, ``primaryType``, ``domain``, ``message``) for a voucher."""
    return typed_message(
        name=DOMAIN_NAME,
        version=DOMAIN_VERSION,
        chain_id=domain.chain_id,
        verifying_contract=domain.contract,
        primary_type="Voucher",
        fields=_VOUCHER_FIELDS,
        message={
            "channelId": check_uint(channel_id, "channel_id"),
            "cumulativeAmount": check_uint(cumulative_amount, "cumulative_amount"),
        },
    )


def voucher_digest(domain: VoucherDomain, channel_id: int, cumulative_amount: int) -> bytes:
    """``keccak256(0x1901 || domainSeparator || structHash)``: what the contract's ``voucherDigest`` returns."""
    return typed_digest(voucher_typed_data(domain, channel_id, cumulative_amount))


def sign_voucher(account: LocalAccount, domain: VoucherDomain, channel_id: int, cumulative_amount: int) -> Voucher:
    """Sign a voucher for ``cumulative_amount`` wei owed in total on ``channel_id`` with the client's key."""
    signature = sign_typed(account, voucher_typed_data(domain, channel_id, cumulative_amount))
    return Voucher(
        domain=domain,
        channel_id=channel_id,
        cumulative_amount=Wei(cumulative_amount),
        signature=signature,
    )


class VoucherRejected(ChainError):
    """A voucher a model node must not accept; ``code`` says why (stable, for the wire and for metrics).

    ``channel_id`` is the voucher's channel. The signature is never part of the message.
    """

    code = "voucher_rejected"

    def __init__(self, channel_id: int, detail: str) -> None:
        self.channel_id = channel_id
        super().__init__(f"voucher for channel {channel_id} rejected ({self.code}): {detail}")


class VoucherForged(VoucherRejected):
    """The signature is malformed, malleated, or not the channel client's (``signer`` is who did sign, or None)."""

    code = "voucher_forged"

    def __init__(self, channel_id: int, signer: ChecksumAddress | None, client: ChecksumAddress | None) -> None:
        self.signer = signer
        self.client = client
        super().__init__(channel_id, f"signed by {signer or 'nobody'}, the channel's client is {client or '?'}")


class VoucherWrongChain(VoucherRejected):
    """The voucher is for another chain id."""

    code = "voucher_wrong_chain"

    def __init__(self, channel_id: int, expected: int, actual: int) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(channel_id, f"for chain {actual}, this node is paid on chain {expected}")


class VoucherWrongContract(VoucherRejected):
    """The voucher is for another ``PaymentChannels`` contract."""

    code = "voucher_wrong_contract"

    def __init__(self, channel_id: int, expected: ChecksumAddress, actual: ChecksumAddress) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(channel_id, f"for contract {actual}, this node is paid through {expected}")


def recover_voucher_signer(voucher: Voucher) -> ChecksumAddress | None:
    """Who signed ``voucher``, as the contract's ``voucherSigner`` sees it: None for what it would refuse."""
    typed = voucher_typed_data(voucher.domain, voucher.channel_id, voucher.cumulative_amount)
    return recover_typed_signer(typed, voucher.signature)


def verify_voucher(voucher: Voucher, *, domain: VoucherDomain, client: str) -> ChecksumAddress:
    """Check ``voucher`` is for ``domain`` and signed by ``client``; returns the client's address.

    Raises ``VoucherWrongChain``, ``VoucherWrongContract`` or ``VoucherForged`` (checked in that order: a
    voucher for elsewhere is reported as such, not as a forgery).
    """
    expected_client = checksum(client, param="client")
    if voucher.domain.chain_id != domain.chain_id:
        raise VoucherWrongChain(voucher.channel_id, domain.chain_id, voucher.domain.chain_id)
    if voucher.domain.contract != domain.contract:
        raise VoucherWrongContract(voucher.channel_id, domain.contract, voucher.domain.contract)
    signer = recover_voucher_signer(voucher)
    if signer != expected_client:
        raise VoucherForged(voucher.channel_id, signer, expected_client)
    return expected_client


class VoucherWrongChannel(VoucherRejected):
    """The channel does not exist, or it pays another node (``node`` is its node, None when unknown)."""

    code = "voucher_wrong_channel"

    def __init__(self, channel_id: int, node: ChecksumAddress | None) -> None:
        self.node = node
        detail = "no such channel" if node is None else f"the channel pays {node}, not this node"
        super().__init__(channel_id, detail)


class VoucherChannelClosing(VoucherRejected):
    """The client started closing the channel: a new request might not be redeemable before ``closes_at``."""

    code = "voucher_channel_closing"

    def __init__(self, channel_id: int, closes_at: int) -> None:
        self.closes_at = closes_at
        super().__init__(channel_id, f"the channel closes at {closes_at}")


class VoucherReplayed(VoucherRejected):
    """The voucher's amount equals the latest one already accepted on the channel (the same payment twice)."""

    code = "voucher_replayed"

    def __init__(self, channel_id: int, amount: int) -> None:
        self.amount = amount
        super().__init__(channel_id, f"{amount} wei was already accepted")


class VoucherStale(VoucherRejected):
    """The voucher's amount is below the latest accepted (or the redeemed) amount: it pays nothing new."""

    code = "voucher_stale"

    def __init__(self, channel_id: int, amount: int, latest: int) -> None:
        self.amount = amount
        self.latest = latest
        super().__init__(channel_id, f"{amount} wei is not above the latest {latest} wei")


class VoucherUnderpaid(VoucherRejected):
    """The voucher does not cover what is owed plus this request's reservation (``required`` wei)."""

    code = "voucher_underpaid"

    def __init__(self, channel_id: int, amount: int, required: int) -> None:
        self.amount = amount
        self.required = required
        super().__init__(channel_id, f"{amount} wei is below the required {required} wei")


class VoucherUnderfunded(VoucherRejected):
    """The voucher asks for more than the channel's deposit (``deposit`` wei): it could not be redeemed."""

    code = "voucher_underfunded"

    def __init__(self, channel_id: int, amount: int, deposit: int) -> None:
        self.amount = amount
        self.deposit = deposit
        super().__init__(channel_id, f"{amount} wei exceeds the deposit of {deposit} wei")
