"""``Attestations``: the typed handle over the committee-attestation contract, and the records it returns.

Scores, reputations, the threshold and the slash fractions are fixed-point integers with :data:`SCORE_SCALE`
(1e6) = 1.0, exactly as the contract stores them, so a caller can reproduce the contract's arithmetic bit for bit
(see ``docs/verification.md``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from eth_abi.abi import encode
from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from web3 import Web3
from web3.contract import Contract
from web3.contract.contract import ContractFunction
from web3.types import TxReceipt as Web3Receipt

from ledger._artifacts import load_artifact
from ledger._errors import ChainError, InvalidChainInput, OperatorKeyError
from ledger._reverts import RevertDecoder
from ledger._tx import RECEIPT_TIMEOUT, map_call_errors, send_transaction
from ledger._types import TxReceipt, Wei, checksum

_CONTRACT = "Attestations"
_UINT256 = 2**256

#: Fixed-point one: scores, reputations, weights, the threshold and slash fractions are integers over this.
SCORE_SCALE = 1_000_000
#: Reputation of a node never rated (0.5).
NEUTRAL_REPUTATION = 500_000
#: Weight of a passing epoch's median, and the per-failure step of a failing one's (0.2).
ALPHA = 200_000
#: Largest weight of a failing epoch's median (0.8).
MAX_FAILURE_WEIGHT = 800_000
#: Largest committee the contract accepts.
MAX_COMMITTEE = 32
#: Shortest epoch the contract accepts, in seconds.
MIN_EPOCH_LENGTH = 1
#: Epochs back an attestation may go (the current one and the previous one).
MAX_EPOCH_AGE = 1


def quorum_of(committee_size: int) -> int:
    """``ceil(2 * committee_size / 3)``: attestations that finalize a node's epoch."""
    return (2 * committee_size + 2) // 3


def median_of(scores: list[int]) -> int:
    """The contract's median: the middle score, or the floor of the mean of the two middle ones."""
    if not scores:
        raise ValueError("the median of no scores is undefined")
    ordered = sorted(scores)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) // 2


def next_reputation(previous: int, median: int, failure_streak: int) -> int:
    """The contract's update: ``(previous * (SCALE - w) + median * w) // SCALE``.

    ``failure_streak`` is the streak including this epoch (0 for a passing epoch): ``w`` is :data:`ALPHA` for a
    pass and ``min(ALPHA * streak, MAX_FAILURE_WEIGHT)`` for a failure.
    """
    weight = ALPHA if failure_streak == 0 else min(ALPHA * failure_streak, MAX_FAILURE_WEIGHT)
    return (previous * (SCORE_SCALE - weight) + median * weight) // SCORE_SCALE


def evidence_root(attestations: list[tuple[str, int, bytes]]) -> bytes:
    """The contract's chained evidence hash over ``(verifier, score, evidence_hash)`` in arrival order."""
    root = bytes(32)
    for verifier, score, evidence in attestations:
        payload = encode(["bytes32", "address", "uint32", "bytes32"], [root, checksum(verifier), score, evidence])
        root = bytes(Web3.keccak(payload))
    return root


def _uint(value: int, param: str, *, high: int = _UINT256, low: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value < high:
        raise InvalidChainInput(param, value, f"must be an integer in [{low}, {high})")
    return value


def _bytes32(value: bytes, param: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != 32:
        raise InvalidChainInput(param, value, "must be exactly 32 bytes")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class AttestationParams:
    """Constructor parameters of ``Attestations`` (immutable once deployed); validated on construction.

    The epoch-length bound that depends on the registry (at most half its verification window) is checked by the
    contract itself at deployment.
    """

    #: Seconds per epoch, >= :data:`MIN_EPOCH_LENGTH`; None: half the registry's verification window.
    epoch_length: int | None = None
    #: Unix time epoch 0 starts, at most the deployment block's; None: the latest block's timestamp.
    epoch_start: int | None = None
    #: Verifiers per committee, in [1, :data:`MAX_COMMITTEE`]; the quorum is two thirds of it, rounded up.
    committee_size: int = 3
    #: A median below this fails the epoch, fixed-point in [0, :data:`SCORE_SCALE`] (0.5 by default).
    score_threshold: int = 500_000
    #: Fraction of stake slashed on a failing epoch, fixed-point in [1, :data:`SCORE_SCALE`] (10% by default).
    stake_slash_fraction: int = 100_000
    #: Fraction of locked earnings slashed on a failing epoch, fixed-point in [0, :data:`SCORE_SCALE`] (50%).
    earnings_slash_fraction: int = 500_000

    def __post_init__(self) -> None:
        if self.epoch_length is not None:
            _uint(self.epoch_length, "epoch_length", low=MIN_EPOCH_LENGTH, high=2**64)
        if self.epoch_start is not None:
            _uint(self.epoch_start, "epoch_start", high=2**64)
        _uint(self.committee_size, "committee_size", low=1, high=MAX_COMMITTEE + 1)
        _uint(self.score_threshold, "score_threshold", high=SCORE_SCALE + 1)
        _uint(self.stake_slash_fraction, "stake_slash_fraction", low=1, high=SCORE_SCALE + 1)
        _uint(self.earnings_slash_fraction, "earnings_slash_fraction", high=SCORE_SCALE + 1)

    @property
    def quorum(self) -> int:
        """Attestations that finalize a node's epoch."""
        return quorum_of(self.committee_size)


@dataclass(frozen=True, slots=True, kw_only=True)
class EpochTally:
    """One node's attestations for one epoch, as the contract reports them."""

    #: Attestations recorded (at most the quorum).
    count: int
    #: Whether the quorum was reached and the verdict applied.
    finalized: bool
    #: The verdict's median score, fixed-point (0 until finalized).
    median: int
    #: Chained hash of the attestations (see :func:`evidence_root`); passed to the slashes.
    evidence_root: bytes
    #: The recorded scores in arrival order, fixed-point.
    scores: tuple[int, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ReputationRecord:
    """One node's reputation record."""

    #: Reputation, fixed-point in [0, SCORE_SCALE]; NEUTRAL_REPUTATION when never rated.
    reputation: int
    #: Failing epochs in a row up to its latest verdict.
    failure_streak: int
    #: Epochs that reached a verdict.
    epochs_rated: int
    #: Epochs it was penalized (slashed) for.
    penalties: int


def deploy_attestations(
    w3: Web3, deployer: LocalAccount, *, registry: str, payments: str, params: AttestationParams
) -> tuple[ChecksumAddress, int]:
    """Deploy ``Attestations`` against ``registry`` and ``payments``; returns the address and the block.

    Grants no roles: the caller (``deploy_all``) grants it ``SLASHER_ROLE`` on both contracts.
    """
    registry = checksum(registry, param="registry")
    artifact = load_artifact(_CONTRACT)
    decoder = RevertDecoder([artifact.abi])
    epoch_length = params.epoch_length
    if epoch_length is None:
        window = w3.eth.contract(address=registry, abi=list(load_artifact("NodeRegistry").abi))
        epoch_length = int(map_call_errors(decoder, None, window.functions.verificationWindow().call)) // 2
        if epoch_length < MIN_EPOCH_LENGTH:
            raise InvalidChainInput(
                "epoch_length", epoch_length, "half the registry's verification window is under 1 s: set epoch_length"
            )
    epoch_start = params.epoch_start
    if epoch_start is None:
        epoch_start = int(w3.eth.get_block("latest")["timestamp"])
    factory = w3.eth.contract(abi=list(artifact.abi), bytecode=artifact.bytecode)
    constructor = factory.constructor(
        registry,
        checksum(payments, param="payments"),
        epoch_start,
        epoch_length,
        params.committee_size,
        params.score_threshold,
        params.stake_slash_fraction,
        params.earnings_slash_fraction,
    )
    receipt = send_transaction(w3, deployer, constructor, decoder)
    address = receipt["contractAddress"]
    if address is None:
        raise ChainError("the Attestations deployment receipt carries no contract address")
    return checksum(address), int(receipt["blockNumber"])


class Attestations:
    """One deployed ``Attestations``. Reads need no account; writes (``attest``) are signed by ``account``.

    A revert raises the contract's custom error (or the registry's or payment contract's, which the quorum-reaching
    attestation calls) as a :class:`~ledger.ContractRevert` subclass with its decoded arguments.
    """

    def __init__(
        self,
        w3: Web3,
        address: str,
        account: LocalAccount | None = None,
        *,
        receipt_timeout: float = RECEIPT_TIMEOUT,
    ) -> None:
        """``receipt_timeout``: seconds each write waits for its receipt before ``TransactionOutcomeUnknown``."""
        if not receipt_timeout > 0:
            raise InvalidChainInput("receipt_timeout", receipt_timeout, "must be a positive number of seconds")
        artifact = load_artifact(_CONTRACT)
        self._w3 = w3
        self._address = checksum(address, param="attestations address")
        self._account = account
        self._receipt_timeout = receipt_timeout
        self._contract: Contract = w3.eth.contract(address=self._address, abi=list(artifact.abi))
        # The quorum-reaching attestation calls both slashers: decode their errors too.
        self._decoder = RevertDecoder(
            [artifact.abi, load_artifact("NodeRegistry").abi, load_artifact("PaymentChannels").abi]
        )
        self._events_by_topic = {
            bytes(Web3.keccak(text=_event_signature(item))): str(item["name"])
            for item in artifact.abi
            if item.get("type") == "event"
        }

    @property
    def address(self) -> ChecksumAddress:
        """The contract's checksummed address."""
        return self._address

    @property
    def w3(self) -> Web3:
        """The ``Web3`` the handle talks through."""
        return self._w3

    @property
    def contract(self) -> Contract:
        """The raw web3 contract (for the indexer's log decoding; callers use the domain methods)."""
        return self._contract

    @property
    def account(self) -> ChecksumAddress:
        """The signing account's address; ``OperatorKeyError`` when the handle is read-only."""
        return self._signer().address

    def with_account(self, account: LocalAccount) -> Attestations:
        """The same contract, signing with ``account`` (same receipt timeout)."""
        return Attestations(self._w3, self._address, account, receipt_timeout=self._receipt_timeout)

    # -- reads -------------------------------------------------------------------------------------------------

    def reputation_of(self, node: str) -> int:
        """``node``'s reputation, fixed-point (:data:`NEUTRAL_REPUTATION` when never rated)."""
        return int(self._call(self._contract.functions.reputationOf(checksum(node, param="node"))))

    def record_of(self, node: str) -> ReputationRecord:
        """``node``'s reputation, failure streak, rated epochs and penalties."""
        reputation, streak, rated, penalties = self._call(
            self._contract.functions.recordOf(checksum(node, param="node"))
        )
        return ReputationRecord(
            reputation=int(reputation), failure_streak=int(streak), epochs_rated=int(rated), penalties=int(penalties)
        )

    def tally(self, node: str, epoch: int) -> EpochTally:
        """The attestations so far for ``node`` in ``epoch``."""
        address, epoch = checksum(node, param="node"), _uint(epoch, "epoch")
        count, finalized, median, root = self._call(self._contract.functions.tallyOf(address, epoch))
        scores = self._call(self._contract.functions.scoresOf(address, epoch))
        return EpochTally(
            count=int(count),
            finalized=bool(finalized),
            median=int(median),
            evidence_root=bytes(root),
            scores=tuple(int(s) for s in scores),
        )

    def has_attested(self, verifier: str, node: str, epoch: int) -> bool:
        """Whether ``verifier`` attested ``node`` for ``epoch``."""
        fn = self._contract.functions.hasAttested(
            checksum(verifier, param="verifier"), checksum(node, param="node"), _uint(epoch, "epoch")
        )
        return bool(self._call(fn))

    def current_epoch(self) -> int:
        """The epoch of the latest block."""
        return int(self._call(self._contract.functions.currentEpoch()))

    def epoch_start(self) -> int:
        """Unix time epoch 0 starts."""
        return int(self._call(self._contract.functions.epochStart()))

    def epoch_length(self) -> int:
        """Seconds per epoch."""
        return int(self._call(self._contract.functions.epochLength()))

    def committee_size(self) -> int:
        """The committee size the quorum is computed from."""
        return int(self._call(self._contract.functions.committeeSize()))

    def quorum(self) -> int:
        """Attestations that finalize a node's epoch."""
        return int(self._call(self._contract.functions.quorum()))

    def score_threshold(self) -> int:
        """A median below this fails the epoch, fixed-point."""
        return int(self._call(self._contract.functions.scoreThreshold()))

    def stake_slash_fraction(self) -> int:
        """Fraction of stake slashed on a failure, fixed-point."""
        return int(self._call(self._contract.functions.stakeSlashFraction()))

    def earnings_slash_fraction(self) -> int:
        """Fraction of locked earnings slashed on a failure, fixed-point."""
        return int(self._call(self._contract.functions.earningsSlashFraction()))

    def registry(self) -> ChecksumAddress:
        """The node registry."""
        return checksum(self._call(self._contract.functions.registry()))

    def payments(self) -> ChecksumAddress:
        """The payment contract."""
        return checksum(self._call(self._contract.functions.payments()))

    def balance(self) -> Wei:
        """The contract's ETH balance in wei (always 0: nothing is payable)."""
        return Wei(self._w3.eth.get_balance(self._address))

    # -- writes ------------------------------------------------------------------------------------------------

    def attest(self, node: str, epoch: int, score: int, evidence_hash: bytes) -> TxReceipt:
        """Attest ``node``'s ``score`` (fixed-point, [0, SCORE_SCALE]) for ``epoch`` as the signer (a verifier).

        The receipt's events are ``("AttestationSubmitted",)``, or for the quorum-reaching one also
        ``"EpochFinalized"``, ``"ReputationUpdated"`` and, when the median fails, ``"NodePenalized"``.
        """
        fn = self._contract.functions.attest(
            checksum(node, param="node"),
            _uint(epoch, "epoch"),
            _uint(score, "score", high=2**32),
            _bytes32(evidence_hash, "evidence_hash"),
        )
        return self._send(fn)

    # -- internals ---------------------------------------------------------------------------------------------

    def _signer(self) -> LocalAccount:
        if self._account is None:
            raise OperatorKeyError("this operation needs the account key: set PS_PRIVATE_KEY or pass --keystore")
        return self._account

    def _call(self, fn: ContractFunction) -> Any:
        return map_call_errors(self._decoder, None, fn.call)

    def _send(self, fn: ContractFunction) -> TxReceipt:
        receipt = send_transaction(self._w3, self._signer(), fn, self._decoder, receipt_timeout=self._receipt_timeout)
        return self._typed_receipt(receipt)

    def _typed_receipt(self, receipt: Web3Receipt) -> TxReceipt:
        events = tuple(
            self._events_by_topic[bytes(log["topics"][0])]
            for log in receipt["logs"]
            if log["address"] == self._address and log["topics"] and bytes(log["topics"][0]) in self._events_by_topic
        )
        return TxReceipt(
            tx_hash=receipt["transactionHash"].to_0x_hex(),
            block_number=receipt["blockNumber"],
            gas_used=receipt["gasUsed"],
            effective_gas_price=Wei(receipt.get("effectiveGasPrice", 0)),
            events=events,
        )


def _event_signature(item: Mapping[str, Any]) -> str:
    return f"{item['name']}({','.join(p['type'] for p in item['inputs'])})"
