"""Solidity custom errors as Python exceptions, decoded by selector from the compiled ABIs.

Each custom error of our contracts (and the OpenZeppelin errors they can raise) is one class below, named as the
error, whose annotated attributes are its decoded arguments by the Solidity parameter names; the class body is all
there is to write (the base class takes the name and registers it for the decoder). Classes rather than a table of
names: callers catch them by name and mypy checks the attribute types. A test checks that every error in the ABI has
its class here, so a new Solidity error cannot ship without its Python twin.
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


#: Every decodable error class, by Solidity name: each subclass below registers itself (``__init_subclass__``).
REVERT_CLASSES: dict[str, type[ContractRevert]] = {}


class ContractRevert(TransactionFailed):
    """A call or transaction reverted with a decoded error. ``error_name`` and ``values`` give the error.

    A subclass is one Solidity error: its name is the error's name (``error_name``, unless given as a class
    keyword), its annotations are the error's arguments by their Solidity names (set as attributes when decoded),
    and defining it registers it in :data:`REVERT_CLASSES` for the decoder, so no error is written twice.
    ``abi=False`` marks the decoder's own classes (``Error(string)``, ``Panic``, unknown data), which no ABI lists.
    """

    code = "tx_reverted"
    #: The Solidity error name: the class name unless the class says otherwise.
    error_name: ClassVar[str] = ""

    def __init_subclass__(cls, *, abi: bool = True, error_name: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A name given as a keyword or in the class body (the documented way before) wins over the class name.
        cls.error_name = error_name or cls.__dict__.get("error_name") or cls.__name__
        if abi and cls.__module__ == __name__:  # subclasses elsewhere (tests, callers) never join the ABI table
            if cls.error_name in REVERT_CLASSES:
                raise TypeError(f"two classes for the Solidity error {cls.error_name}")
            REVERT_CLASSES[cls.error_name] = cls

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


class UnknownRevert(ContractRevert, abi=False):
    """Revert data whose selector matches no known error; ``data`` is the raw 0x-hex revert data."""

    data: str


class RevertString(ContractRevert, abi=False, error_name="Error"):
    """A ``revert("reason")`` / ``require(cond, "reason")``."""

    reason: str


class Panic(ContractRevert, abi=False):
    """A Solidity panic (``assert``, arithmetic, invalid enum...); ``code_value`` is the panic code."""

    code_value: int
    meaning: str


class NodeRegistryAlreadyRegistered(ContractRevert):
    """The operator already has a node."""

    operator: ChecksumAddress


class NodeRegistryNotRegistered(ContractRevert):
    """The operator has no node."""

    operator: ChecksumAddress


class NodeRegistryStakeBelowMinimum(ContractRevert):
    """The stake (wei) is below the role's minimum (wei)."""

    operator: ChecksumAddress
    role: Role | int
    stake: int
    minimum: int


class NodeRegistryInvalidEndpoint(ContractRevert):
    """The endpoint is empty or longer than ``maxLength`` bytes."""

    length: int
    maxLength: int


class NodeRegistryInvalidPublicKey(ContractRevert):
    """The X25519 public key is zero."""

    x25519PublicKey: bytes


class NodeRegistryInvalidModelId(ContractRevert):
    """Model/verifier nodes need a model id; relays must not give one."""

    role: Role | int
    modelId: bytes


class NodeRegistryZeroAmount(ContractRevert):
    """A call that moves value carried none."""

    operator: ChecksumAddress


class NodeRegistryNodeUnbonding(ContractRevert):
    """The node is unbonding, which forbids the call."""

    operator: ChecksumAddress
    unbondingEndsAt: int


class NodeRegistryNotUnbonding(ContractRevert):
    """The node has not requested unbonding."""

    operator: ChecksumAddress


class NodeRegistryUnbondingNotFinished(ContractRevert):
    """The unbonding delay has not elapsed (times in Unix seconds)."""

    operator: ChecksumAddress
    unbondingEndsAt: int
    currentTime: int


class NodeRegistryNothingToWithdraw(ContractRevert):
    """The account has no pending withdrawal."""

    account: ChecksumAddress


class NodeRegistryTransferFailed(ContractRevert):
    """The recipient refused the payment."""

    to: ChecksumAddress
    amount: int


class NodeRegistryNotJailed(ContractRevert):
    """``unjail`` on a node that is not jailed."""

    operator: ChecksumAddress


class NodeRegistryUnauthorizedTreasury(ContractRevert):
    """Only the treasury may withdraw slashed funds."""

    caller: ChecksumAddress


class NodeRegistryInvalidTreasury(ContractRevert):
    """The treasury address is zero (deployment)."""

    treasury: ChecksumAddress


class NodeRegistryInvalidMinimumStake(ContractRevert):
    """A role's minimum stake (wei) is zero (deployment)."""

    role: Role | int
    minimum: int


class NodeRegistryInvalidVerificationWindow(ContractRevert):
    """The verification window (seconds) is zero (deployment)."""

    verificationWindow: int


class NodeRegistryUnbondingDelayTooShort(ContractRevert):
    """The unbonding delay is shorter than the verification window, both in seconds (deployment)."""

    unbondingDelay: int
    verificationWindow: int


class NodeRegistryUnbondingDelayTooLong(ContractRevert):
    """The unbonding delay exceeds the contract's maximum, both in seconds (deployment)."""

    unbondingDelay: int
    maxUnbondingDelay: int


class AccessControlUnauthorizedAccount(ContractRevert):
    """OpenZeppelin ``AccessControl``: ``account`` lacks ``neededRole`` (32-byte role id)."""

    account: ChecksumAddress
    neededRole: bytes


class AccessControlBadConfirmation(ContractRevert):
    """OpenZeppelin ``AccessControl``: ``renounceRole`` was not confirmed with the caller's own address."""


class AccessControlInvalidDefaultAdmin(ContractRevert):
    """OpenZeppelin ``AccessControlDefaultAdminRules``: the new default admin is unusable (zero, or not pending)."""

    defaultAdmin: ChecksumAddress


class AccessControlEnforcedDefaultAdminRules(ContractRevert):
    """OpenZeppelin ``AccessControlDefaultAdminRules``: the default admin role moves only by the two-step transfer."""


class AccessControlEnforcedDefaultAdminDelay(ContractRevert):
    """OpenZeppelin ``AccessControlDefaultAdminRules``: the admin transfer cannot be accepted before ``schedule``
    (Unix seconds)."""

    schedule: int


class SafeCastOverflowedUintDowncast(ContractRevert):
    """OpenZeppelin ``SafeCast``: ``value`` does not fit in ``bits`` bits."""

    bits: int
    value: int


class OwnableUnauthorizedAccount(ContractRevert):
    """OpenZeppelin ``Ownable``: the caller is not the owner."""

    account: ChecksumAddress


class OwnableInvalidOwner(ContractRevert):
    """OpenZeppelin ``Ownable``: the owner address is invalid (zero)."""

    owner: ChecksumAddress


class ReentrancyGuardReentrantCall(ContractRevert):
    """OpenZeppelin ``ReentrancyGuardTransient``: a guarded function was re-entered."""


# -- PaymentChannels (engineer H7's block: contracts/PaymentChannels.sol) ---------------------------------------


class PaymentChannelsZeroAmount(ContractRevert):
    """A payable call carried no value, or a slash asked for zero."""

    caller: ChecksumAddress


class PaymentChannelsDepositTooLarge(ContractRevert):
    """A deposit (wei) would exceed the largest representable one (2**96 - 1 wei); ``channelId`` 0 when opening."""

    channelId: int
    deposit: int
    maximum: int


class PaymentChannelsInvalidNode(ContractRevert):
    """A channel's node is zero or the client itself."""

    node: ChecksumAddress


class PaymentChannelsUnknownChannel(ContractRevert):
    """No channel has this id."""

    channelId: int


class PaymentChannelsNotClient(ContractRevert):
    """Only the channel's client may top it up or close it."""

    channelId: int
    caller: ChecksumAddress
    client: ChecksumAddress


class PaymentChannelsNotNode(ContractRevert):
    """Only the channel's node may redeem on it."""

    channelId: int
    caller: ChecksumAddress
    node: ChecksumAddress


class PaymentChannelsChannelClosing(ContractRevert):
    """The channel is already closing (``closesAt`` in Unix seconds): no top-up, no second close."""

    channelId: int
    closesAt: int


class PaymentChannelsChannelClosed(ContractRevert):
    """The dispute delay is over (times in Unix seconds): the node can no longer redeem."""

    channelId: int
    closesAt: int
    currentTime: int


class PaymentChannelsCloseNotStarted(ContractRevert):
    """``finishClose`` on a channel whose client has not started closing it."""

    channelId: int


class PaymentChannelsDisputeNotOver(ContractRevert):
    """``finishClose`` before the dispute delay ended (times in Unix seconds)."""

    channelId: int
    closesAt: int
    currentTime: int


class PaymentChannelsAlreadySettled(ContractRevert):
    """The channel was already settled."""

    channelId: int


class PaymentChannelsInvalidSignature(ContractRevert):
    """The voucher is not the client's signature (``signer`` is zero for a malformed or high-s signature)."""

    channelId: int
    signer: ChecksumAddress
    client: ChecksumAddress


class PaymentChannelsVoucherNotAboveRedeemed(ContractRevert):
    """The voucher's cumulative amount (wei) is not above what was already redeemed: nothing new to pay."""

    channelId: int
    cumulativeAmount: int
    redeemed: int


class PaymentChannelsVoucherExceedsDeposit(ContractRevert):
    """The voucher asks for more (wei) than the channel's deposit (wei)."""

    channelId: int
    cumulativeAmount: int
    deposit: int


class PaymentChannelsNodeJailed(ContractRevert):
    """The registry has jailed the node: it may not redeem."""

    node: ChecksumAddress


class PaymentChannelsInvalidBatchSize(ContractRevert):
    """A batch redemption must carry 1..``maxLength`` vouchers."""

    length: int
    maxLength: int


class PaymentChannelsNothingToWithdraw(ContractRevert):
    """The account has nothing withdrawable (locked earnings do not count)."""

    account: ChecksumAddress


class PaymentChannelsTransferFailed(ContractRevert):
    """The recipient refused the payment."""

    to: ChecksumAddress
    amount: int


class PaymentChannelsInvalidConfig(ContractRevert):
    """A constructor argument is unusable: a zero registry or treasury, or a zero verification window (s)."""

    registry: ChecksumAddress
    treasury: ChecksumAddress
    verificationWindow: int


class InvalidShortString(ContractRevert):
    """OpenZeppelin ``ShortStrings`` (EIP-712 name/version): a stored short string is malformed."""


class StringTooLong(ContractRevert):
    """OpenZeppelin ``ShortStrings`` (EIP-712 name/version): a string is too long to store inline."""

    str: str


# -- Attestations (engineer H9's block: contracts/Attestations.sol) ---------------------------------------------


class AttestationsNotVerifier(ContractRevert):
    """The caller has no verifier node in the registry."""

    account: ChecksumAddress


class AttestationsVerifierInactive(ContractRevert):
    """The caller's verifier node is unbonding, jailed or below the minimum stake."""

    verifier: ChecksumAddress


class AttestationsNotModelNode(ContractRevert):
    """The attested address is not a registered model node."""

    node: ChecksumAddress


class AttestationsScoreOutOfRange(ContractRevert):
    """The score exceeds ``maximum`` (the fixed-point scale, 1e6 = 1.0)."""

    score: int
    maximum: int


class AttestationsMissingEvidence(ContractRevert):
    """The evidence hash is zero."""

    verifier: ChecksumAddress
    node: ChecksumAddress
    epoch: int


class AttestationsFutureEpoch(ContractRevert):
    """The attested epoch has not started yet."""

    epoch: int
    currentEpoch: int


class AttestationsEpochTooOld(ContractRevert):
    """The attested epoch is more than ``maxAge`` epochs before the current one."""

    epoch: int
    currentEpoch: int
    maxAge: int


class AttestationsAlreadyAttested(ContractRevert):
    """The verifier already attested this node for this epoch."""

    verifier: ChecksumAddress
    node: ChecksumAddress
    epoch: int


class AttestationsEpochFinalized(ContractRevert):
    """The node's epoch already reached quorum with ``median``; later attestations are refused."""

    node: ChecksumAddress
    epoch: int
    median: int


class AttestationsInvalidContracts(ContractRevert):
    """A constructor argument is unusable: a zero registry or payment contract."""

    registry: ChecksumAddress
    payments: ChecksumAddress


class AttestationsInvalidEpochLength(ContractRevert):
    """A constructor argument is unusable: the epoch length (s) is outside [minimum, maximum]."""

    epochLength: int
    minimum: int
    maximum: int


class AttestationsInvalidEpochStart(ContractRevert):
    """A constructor argument is unusable: epoch 0 starts (unix s) after the deployment block."""

    epochStart: int
    currentTime: int


class AttestationsInvalidCommitteeSize(ContractRevert):
    """A constructor argument is unusable: the committee size is outside [1, maximum]."""

    committeeSize: int
    maximum: int


class AttestationsInvalidThreshold(ContractRevert):
    """A constructor argument is unusable: the score threshold exceeds the fixed-point scale."""

    scoreThreshold: int
    scale: int


class AttestationsInvalidSlashFraction(ContractRevert):
    """A constructor argument is unusable: a stake fraction outside [1, scale] or an earnings one above scale."""

    stakeSlashFraction: int
    earningsSlashFraction: int
    scale: int


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
