"""Solidity custom errors as Python exceptions, decoded by selector from the compiled ABIs.

Each custom error of our contracts (and the OpenZeppelin errors they can raise) is one class below whose
annotated attributes are the error's decoded arguments, by the Solidity parameter names. A test checks that every
error in the ABI has its class here, so a new Solidity error cannot ship without its Python twin.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from eth_abi.abi import decode
from eth_abi.exceptions import DecodingError
from eth_typing import ChecksumAddress
from eth_utils.abi import function_signature_to_4byte_selector
from eth_utils.address import to_checksum_address

from ledger._errors import ChainError, TransactionFailed
from ledger._types import Role

_PANIC_REASONS = {
    0x01: "assert failed",
    0x11: "arithmetic overflow or underflow",
    0x12: "division by zero",
    0x21: "invalid enum value",
    0x32: "array index out of bounds",
    0x41: "out of memory",
}


class ContractRevert(TransactionFailed):
    """A call or transaction reverted with a decoded error. ``error_name`` and ``values`` give the error."""

    code = "tx_reverted"
    #: The Solidity error name; subclasses set it to their own class name.
    error_name: ClassVar[str] = ""

    def __init__(self, values: Mapping[str, Any], *, tx_hash: str | None = None) -> None:
        self.values = dict(values)
        for key, value in self.values.items():
            setattr(self, key, value)
        rendered = ", ".join(f"{k}={_render(v)}" for k, v in self.values.items())
        super().__init__(f"transaction reverted: {self.error_name}({rendered})", tx_hash=tx_hash)


def _render(value: Any) -> str:
    if isinstance(value, bytes):
        return "0x" + value.hex()
    if isinstance(value, Role):
        return value.name.lower()
    return str(value)


class UnknownRevert(ContractRevert):
    """Revert data whose selector matches no known error; ``data`` is the raw 0x-hex revert data."""

    error_name = "UnknownRevert"
    data: str


class RevertString(ContractRevert):
    """A ``revert("reason")`` / ``require(cond, "reason")``."""

    error_name = "Error"
    reason: str


class Panic(ContractRevert):
    """A Solidity panic (``assert``, arithmetic, invalid enum...); ``code_value`` is the panic code."""

    error_name = "Panic"
    code_value: int
    meaning: str


class NodeRegistryAlreadyRegistered(ContractRevert):
    """The operator already has a node."""

    error_name = "NodeRegistryAlreadyRegistered"
    operator: ChecksumAddress


class NodeRegistryNotRegistered(ContractRevert):
    """The operator has no node."""

    error_name = "NodeRegistryNotRegistered"
    operator: ChecksumAddress


class NodeRegistryStakeBelowMinimum(ContractRevert):
    """The stake (wei) is below the role's minimum (wei)."""

    error_name = "NodeRegistryStakeBelowMinimum"
    operator: ChecksumAddress
    role: Role | int
    stake: int
    minimum: int


class NodeRegistryInvalidEndpoint(ContractRevert):
    """The endpoint is empty or longer than ``maxLength`` bytes."""

    error_name = "NodeRegistryInvalidEndpoint"
    length: int
    maxLength: int


class NodeRegistryInvalidPublicKey(ContractRevert):
    """The X25519 public key is zero."""

    error_name = "NodeRegistryInvalidPublicKey"
    x25519PublicKey: bytes


class NodeRegistryInvalidModelId(ContractRevert):
    """Model/verifier nodes need a model id; relays must not give one."""

    error_name = "NodeRegistryInvalidModelId"
    role: Role | int
    modelId: bytes


class NodeRegistryZeroAmount(ContractRevert):
    """A call that moves value carried none."""

    error_name = "NodeRegistryZeroAmount"
    operator: ChecksumAddress


class NodeRegistryNodeUnbonding(ContractRevert):
    """The node is unbonding, which forbids the call."""

    error_name = "NodeRegistryNodeUnbonding"
    operator: ChecksumAddress
    unbondingEndsAt: int


class NodeRegistryNotUnbonding(ContractRevert):
    """The node has not requested unbonding."""

    error_name = "NodeRegistryNotUnbonding"
    operator: ChecksumAddress


class NodeRegistryUnbondingNotFinished(ContractRevert):
    """The unbonding delay has not elapsed (times in Unix seconds)."""

    error_name = "NodeRegistryUnbondingNotFinished"
    operator: ChecksumAddress
    unbondingEndsAt: int
    currentTime: int


class NodeRegistryNothingToWithdraw(ContractRevert):
    """The account has no pending withdrawal."""

    error_name = "NodeRegistryNothingToWithdraw"
    account: ChecksumAddress


class NodeRegistryTransferFailed(ContractRevert):
    """The recipient refused the payment."""

    error_name = "NodeRegistryTransferFailed"
    to: ChecksumAddress
    amount: int


class NodeRegistryNotJailed(ContractRevert):
    """``unjail`` on a node that is not jailed."""

    error_name = "NodeRegistryNotJailed"
    operator: ChecksumAddress


class NodeRegistryUnauthorizedTreasury(ContractRevert):
    """Only the treasury may withdraw slashed funds."""

    error_name = "NodeRegistryUnauthorizedTreasury"
    caller: ChecksumAddress


class NodeRegistryInvalidTreasury(ContractRevert):
    """The treasury address is zero (deployment)."""

    error_name = "NodeRegistryInvalidTreasury"
    treasury: ChecksumAddress


class NodeRegistryInvalidMinimumStake(ContractRevert):
    """A role's minimum stake (wei) is zero (deployment)."""

    error_name = "NodeRegistryInvalidMinimumStake"
    role: Role | int
    minimum: int


class NodeRegistryInvalidVerificationWindow(ContractRevert):
    """The verification window (seconds) is zero (deployment)."""

    error_name = "NodeRegistryInvalidVerificationWindow"
    verificationWindow: int


class NodeRegistryUnbondingDelayTooShort(ContractRevert):
    """The unbonding delay is shorter than the verification window, both in seconds (deployment)."""

    error_name = "NodeRegistryUnbondingDelayTooShort"
    unbondingDelay: int
    verificationWindow: int


class NodeRegistryUnbondingDelayTooLong(ContractRevert):
    """The unbonding delay exceeds the contract's maximum, both in seconds (deployment)."""

    error_name = "NodeRegistryUnbondingDelayTooLong"
    unbondingDelay: int
    maxUnbondingDelay: int


class AccessControlUnauthorizedAccount(ContractRevert):
    """OpenZeppelin ``AccessControl``: ``account`` lacks ``neededRole`` (32-byte role id)."""

    error_name = "AccessControlUnauthorizedAccount"
    account: ChecksumAddress
    neededRole: bytes


class AccessControlBadConfirmation(ContractRevert):
    """OpenZeppelin ``AccessControl``: ``renounceRole`` was not confirmed with the caller's own address."""

    error_name = "AccessControlBadConfirmation"


class AccessControlInvalidDefaultAdmin(ContractRevert):
    """OpenZeppelin ``AccessControlDefaultAdminRules``: the new default admin is unusable (zero, or not pending)."""

    error_name = "AccessControlInvalidDefaultAdmin"
    defaultAdmin: ChecksumAddress


class AccessControlEnforcedDefaultAdminRules(ContractRevert):
    """OpenZeppelin ``AccessControlDefaultAdminRules``: the default admin role moves only by the two-step transfer."""

    error_name = "AccessControlEnforcedDefaultAdminRules"


class AccessControlEnforcedDefaultAdminDelay(ContractRevert):
    """OpenZeppelin ``AccessControlDefaultAdminRules``: the admin transfer cannot be accepted before ``schedule``
    (Unix seconds)."""

    error_name = "AccessControlEnforcedDefaultAdminDelay"
    schedule: int


class SafeCastOverflowedUintDowncast(ContractRevert):
    """OpenZeppelin ``SafeCast``: ``value`` does not fit in ``bits`` bits."""

    error_name = "SafeCastOverflowedUintDowncast"
    bits: int
    value: int


class OwnableUnauthorizedAccount(ContractRevert):
    """OpenZeppelin ``Ownable``: the caller is not the owner."""

    error_name = "OwnableUnauthorizedAccount"
    account: ChecksumAddress


class OwnableInvalidOwner(ContractRevert):
    """OpenZeppelin ``Ownable``: the owner address is invalid (zero)."""

    error_name = "OwnableInvalidOwner"
    owner: ChecksumAddress


class ReentrancyGuardReentrantCall(ContractRevert):
    """OpenZeppelin ``ReentrancyGuardTransient``: a guarded function was re-entered."""

    error_name = "ReentrancyGuardReentrantCall"


# -- PaymentChannels (engineer H7's block: contracts/PaymentChannels.sol) ---------------------------------------


class PaymentChannelsZeroAmount(ContractRevert):
    """A payable call carried no value, or a slash asked for zero."""

    error_name = "PaymentChannelsZeroAmount"
    caller: ChecksumAddress


class PaymentChannelsDepositTooLarge(ContractRevert):
    """A deposit (wei) would exceed the largest representable one (2**96 - 1 wei); ``channelId`` 0 when opening."""

    error_name = "PaymentChannelsDepositTooLarge"
    channelId: int
    deposit: int
    maximum: int


class PaymentChannelsInvalidNode(ContractRevert):
    """A channel's node is zero or the client itself."""

    error_name = "PaymentChannelsInvalidNode"
    node: ChecksumAddress


class PaymentChannelsUnknownChannel(ContractRevert):
    """No channel has this id."""

    error_name = "PaymentChannelsUnknownChannel"
    channelId: int


class PaymentChannelsNotClient(ContractRevert):
    """Only the channel's client may top it up or close it."""

    error_name = "PaymentChannelsNotClient"
    channelId: int
    caller: ChecksumAddress
    client: ChecksumAddress


class PaymentChannelsNotNode(ContractRevert):
    """Only the channel's node may redeem on it."""

    error_name = "PaymentChannelsNotNode"
    channelId: int
    caller: ChecksumAddress
    node: ChecksumAddress


class PaymentChannelsChannelClosing(ContractRevert):
    """The channel is already closing (``closesAt`` in Unix seconds): no top-up, no second close."""

    error_name = "PaymentChannelsChannelClosing"
    channelId: int
    closesAt: int


class PaymentChannelsChannelClosed(ContractRevert):
    """The dispute delay is over (times in Unix seconds): the node can no longer redeem."""

    error_name = "PaymentChannelsChannelClosed"
    channelId: int
    closesAt: int
    currentTime: int


class PaymentChannelsCloseNotStarted(ContractRevert):
    """``finishClose`` on a channel whose client has not started closing it."""

    error_name = "PaymentChannelsCloseNotStarted"
    channelId: int


class PaymentChannelsDisputeNotOver(ContractRevert):
    """``finishClose`` before the dispute delay ended (times in Unix seconds)."""

    error_name = "PaymentChannelsDisputeNotOver"
    channelId: int
    closesAt: int
    currentTime: int


class PaymentChannelsAlreadySettled(ContractRevert):
    """The channel was already settled."""

    error_name = "PaymentChannelsAlreadySettled"
    channelId: int


class PaymentChannelsInvalidSignature(ContractRevert):
    """The voucher is not the client's signature (``signer`` is zero for a malformed or high-s signature)."""

    error_name = "PaymentChannelsInvalidSignature"
    channelId: int
    signer: ChecksumAddress
    client: ChecksumAddress


class PaymentChannelsVoucherNotAboveRedeemed(ContractRevert):
    """The voucher's cumulative amount (wei) is not above what was already redeemed: nothing new to pay."""

    error_name = "PaymentChannelsVoucherNotAboveRedeemed"
    channelId: int
    cumulativeAmount: int
    redeemed: int


class PaymentChannelsVoucherExceedsDeposit(ContractRevert):
    """The voucher asks for more (wei) than the channel's deposit (wei)."""

    error_name = "PaymentChannelsVoucherExceedsDeposit"
    channelId: int
    cumulativeAmount: int
    deposit: int


class PaymentChannelsNodeJailed(ContractRevert):
    """The registry has jailed the node: it may not redeem."""

    error_name = "PaymentChannelsNodeJailed"
    node: ChecksumAddress


class PaymentChannelsInvalidBatchSize(ContractRevert):
    """A batch redemption must carry 1..``maxLength`` vouchers."""

    error_name = "PaymentChannelsInvalidBatchSize"
    length: int
    maxLength: int


class PaymentChannelsNothingToWithdraw(ContractRevert):
    """The account has nothing withdrawable (locked earnings do not count)."""

    error_name = "PaymentChannelsNothingToWithdraw"
    account: ChecksumAddress


class PaymentChannelsTransferFailed(ContractRevert):
    """The recipient refused the payment."""

    error_name = "PaymentChannelsTransferFailed"
    to: ChecksumAddress
    amount: int


class PaymentChannelsInvalidConfig(ContractRevert):
    """A constructor argument is unusable: a zero registry or treasury, or a zero verification window (s)."""

    error_name = "PaymentChannelsInvalidConfig"
    registry: ChecksumAddress
    treasury: ChecksumAddress
    verificationWindow: int


class InvalidShortString(ContractRevert):
    """OpenZeppelin ``ShortStrings`` (EIP-712 name/version): a stored short string is malformed."""

    error_name = "InvalidShortString"


class StringTooLong(ContractRevert):
    """OpenZeppelin ``ShortStrings`` (EIP-712 name/version): a string is too long to store inline."""

    error_name = "StringTooLong"
    str: str


#: H7's PaymentChannels errors, registered below with the rest.
_PAYMENT_CHANNEL_REVERTS: tuple[type[ContractRevert], ...] = (
    PaymentChannelsZeroAmount,
    PaymentChannelsDepositTooLarge,
    PaymentChannelsInvalidNode,
    PaymentChannelsUnknownChannel,
    PaymentChannelsNotClient,
    PaymentChannelsNotNode,
    PaymentChannelsChannelClosing,
    PaymentChannelsChannelClosed,
    PaymentChannelsCloseNotStarted,
    PaymentChannelsDisputeNotOver,
    PaymentChannelsAlreadySettled,
    PaymentChannelsInvalidSignature,
    PaymentChannelsVoucherNotAboveRedeemed,
    PaymentChannelsVoucherExceedsDeposit,
    PaymentChannelsNodeJailed,
    PaymentChannelsInvalidBatchSize,
    PaymentChannelsNothingToWithdraw,
    PaymentChannelsTransferFailed,
    PaymentChannelsInvalidConfig,
    InvalidShortString,
    StringTooLong,
)


# -- Attestations (engineer H9's block: contracts/Attestations.sol) ---------------------------------------------


class AttestationsNotVerifier(ContractRevert):
    """The caller has no verifier node in the registry."""

    error_name = "AttestationsNotVerifier"
    account: ChecksumAddress


class AttestationsVerifierInactive(ContractRevert):
    """The caller's verifier node is unbonding, jailed or below the minimum stake."""

    error_name = "AttestationsVerifierInactive"
    verifier: ChecksumAddress


class AttestationsNotModelNode(ContractRevert):
    """The attested address is not a registered model node."""

    error_name = "AttestationsNotModelNode"
    node: ChecksumAddress


class AttestationsScoreOutOfRange(ContractRevert):
    """The score exceeds ``maximum`` (the fixed-point scale, 1e6 = 1.0)."""

    error_name = "AttestationsScoreOutOfRange"
    score: int
    maximum: int


class AttestationsMissingEvidence(ContractRevert):
    """The evidence hash is zero."""

    error_name = "AttestationsMissingEvidence"
    verifier: ChecksumAddress
    node: ChecksumAddress
    epoch: int


class AttestationsFutureEpoch(ContractRevert):
    """The attested epoch has not started yet."""

    error_name = "AttestationsFutureEpoch"
    epoch: int
    currentEpoch: int


class AttestationsEpochTooOld(ContractRevert):
    """The attested epoch is more than ``maxAge`` epochs before the current one."""

    error_name = "AttestationsEpochTooOld"
    epoch: int
    currentEpoch: int
    maxAge: int


class AttestationsAlreadyAttested(ContractRevert):
    """The verifier already attested this node for this epoch."""

    error_name = "AttestationsAlreadyAttested"
    verifier: ChecksumAddress
    node: ChecksumAddress
    epoch: int


class AttestationsEpochFinalized(ContractRevert):
    """The node's epoch already reached quorum with ``median``; later attestations are refused."""

    error_name = "AttestationsEpochFinalized"
    node: ChecksumAddress
    epoch: int
    median: int


class AttestationsInvalidContracts(ContractRevert):
    """A constructor argument is unusable: a zero registry or payment contract."""

    error_name = "AttestationsInvalidContracts"
    registry: ChecksumAddress
    payments: ChecksumAddress


class AttestationsInvalidEpochLength(ContractRevert):
    """A constructor argument is unusable: the epoch length (s) is outside [minimum, maximum]."""

    error_name = "AttestationsInvalidEpochLength"
    epochLength: int
    minimum: int
    maximum: int


class AttestationsInvalidEpochStart(ContractRevert):
    """A constructor argument is unusable: epoch 0 starts (unix s) after the deployment block."""

    error_name = "AttestationsInvalidEpochStart"
    epochStart: int
    currentTime: int


class AttestationsInvalidCommitteeSize(ContractRevert):
    """A constructor argument is unusable: the committee size is outside [1, maximum]."""

    error_name = "AttestationsInvalidCommitteeSize"
    committeeSize: int
    maximum: int


class AttestationsInvalidThreshold(ContractRevert):
    """A constructor argument is unusable: the score threshold exceeds the fixed-point scale."""

    error_name = "AttestationsInvalidThreshold"
    scoreThreshold: int
    scale: int


class AttestationsInvalidSlashFraction(ContractRevert):
    """A constructor argument is unusable: a stake fraction outside [1, scale] or an earnings one above scale."""

    error_name = "AttestationsInvalidSlashFraction"
    stakeSlashFraction: int
    earningsSlashFraction: int
    scale: int


#: H9's Attestations errors, registered below with the rest.
_ATTESTATION_REVERTS: tuple[type[ContractRevert], ...] = (
    AttestationsNotVerifier,
    AttestationsVerifierInactive,
    AttestationsNotModelNode,
    AttestationsScoreOutOfRange,
    AttestationsMissingEvidence,
    AttestationsFutureEpoch,
    AttestationsEpochTooOld,
    AttestationsAlreadyAttested,
    AttestationsEpochFinalized,
    AttestationsInvalidContracts,
    AttestationsInvalidEpochLength,
    AttestationsInvalidEpochStart,
    AttestationsInvalidCommitteeSize,
    AttestationsInvalidThreshold,
    AttestationsInvalidSlashFraction,
)


#: Every decodable error class, by Solidity name.
REVERT_CLASSES: dict[str, type[ContractRevert]] = {
    cls.error_name: cls
    for cls in (
        NodeRegistryAlreadyRegistered,
        NodeRegistryNotRegistered,
        NodeRegistryStakeBelowMinimum,
        NodeRegistryInvalidEndpoint,
        NodeRegistryInvalidPublicKey,
        NodeRegistryInvalidModelId,
        NodeRegistryZeroAmount,
        NodeRegistryNodeUnbonding,
        NodeRegistryNotUnbonding,
        NodeRegistryUnbondingNotFinished,
        NodeRegistryNothingToWithdraw,
        NodeRegistryTransferFailed,
        NodeRegistryNotJailed,
        NodeRegistryUnauthorizedTreasury,
        NodeRegistryInvalidTreasury,
        NodeRegistryInvalidMinimumStake,
        NodeRegistryInvalidVerificationWindow,
        NodeRegistryUnbondingDelayTooShort,
        NodeRegistryUnbondingDelayTooLong,
        AccessControlUnauthorizedAccount,
        AccessControlBadConfirmation,
        AccessControlInvalidDefaultAdmin,
        AccessControlEnforcedDefaultAdminRules,
        AccessControlEnforcedDefaultAdminDelay,
        SafeCastOverflowedUintDowncast,
        OwnableUnauthorizedAccount,
        OwnableInvalidOwner,
        ReentrancyGuardReentrantCall,
    )
}
REVERT_CLASSES.update({cls.error_name: cls for cls in _PAYMENT_CHANNEL_REVERTS})
REVERT_CLASSES.update({cls.error_name: cls for cls in _ATTESTATION_REVERTS})


def _abi_type(param: Mapping[str, Any]) -> str:
    if param["type"].startswith("tuple"):
        raise ChainError("tuple-typed error arguments are not supported by the revert decoder")
    return str(param["type"])


class RevertDecoder:
    """Maps 4-byte selectors of the given ABIs' errors to their classes and argument types."""

    def __init__(self, abis: Iterable[Iterable[Mapping[str, Any]]]) -> None:
        self._by_selector: dict[bytes, tuple[type[ContractRevert], list[str], list[str], list[bool]]] = {}
        for abi in abis:
            for item in abi:
                if item.get("type") != "error":
                    continue
                types = [_abi_type(p) for p in item["inputs"]]
                names = [p["name"] for p in item["inputs"]]
                enums = [str(p.get("internalType", "")) == "enum NodeRegistry.Role" for p in item["inputs"]]
                signature = f"{item['name']}({','.join(types)})"
                cls = REVERT_CLASSES.get(item["name"])
                if cls is None:
                    raise ChainError(f"ABI error {signature} has no Python class in ledger/_reverts.py")
                self._by_selector[function_signature_to_4byte_selector(signature)] = (cls, types, names, enums)

    def decode(self, data: str | bytes | None, *, tx_hash: str | None = None) -> ContractRevert:
        """The exception for raw revert ``data``; unknown or malformed data gives ``UnknownRevert``."""
        raw = _to_bytes(data)
        selector, body = raw[:4], raw[4:]
        if selector == function_signature_to_4byte_selector("Error(string)"):
            return RevertString({"reason": _decode_or(["string"], body, [""])[0]}, tx_hash=tx_hash)
        if selector == function_signature_to_4byte_selector("Panic(uint256)"):
            (code,) = _decode_or(["uint256"], body, [-1])
            return Panic({"code_value": code, "meaning": _PANIC_REASONS.get(code, "unknown")}, tx_hash=tx_hash)
        entry = self._by_selector.get(selector)
        if entry is None:
            return UnknownRevert({"data": "0x" + raw.hex()}, tx_hash=tx_hash)
        cls, types, names, enums = entry
        try:
            values = decode(types, body, strict=True)
        except (DecodingError, ValueError, OverflowError):
            return UnknownRevert({"data": "0x" + raw.hex()}, tx_hash=tx_hash)
        decoded = {
            name: _convert(typ, is_role, value)
            for name, typ, is_role, value in zip(names, types, enums, values, strict=True)
        }
        return cls(decoded, tx_hash=tx_hash)


def _convert(typ: str, is_role: bool, value: Any) -> Any:
    if typ == "address":
        return to_checksum_address(value)
    if is_role and value in iter(Role):
        return Role(value)
    return value


def _decode_or(types: list[str], body: bytes, default: list[Any]) -> list[Any]:
    try:
        return list(decode(types, body))
    except (DecodingError, ValueError, OverflowError):
        return default


def _to_bytes(data: str | bytes | None) -> bytes:
    if data is None:
        return b""
    if isinstance(data, bytes):
        return data
    text = data[2:] if data.startswith("0x") else data
    try:
        return bytes.fromhex(text)
    except ValueError:
        return b""
