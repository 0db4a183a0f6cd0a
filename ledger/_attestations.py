"""``Attestations``: the typed handle over the committee-attestation contract, and the records it returns.

Scores, reputations, the threshold and the slash fractions are fixed-point integers with :data:`SCORE_SCALE`
(1e6) = 1.0, exactly as the contract stores them, so a caller can reproduce the contract's arithmetic bit for bit
(see ``docs/verification.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

from eth_abi.abi import encode
from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from web3 import Web3

from ledger._artifacts import load_artifact
from ledger._errors import ChainError, InvalidChainInput
from ledger._handle import ContractHandle
from ledger._reverts import RevertDecoder
from ledger._tx import map_call_errors, send_transaction
from ledger._types import TxReceipt, check_bytes32, check_uint, checksum

_CONTRACT = "Attestations"

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


#: Least gas limit an attestation is sent with: the quorum-reaching, slashing path measured 187k at quorum 2
#: (bench/gas.py); the median's sort grows with the quorum (at most 22), so twice that leaves room.
ATTEST_GAS_FLOOR = 400_000


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
            check_uint(self.epoch_length, "epoch_length", low=MIN_EPOCH_LENGTH, high=2**64)
        if self.epoch_start is not None:
            check_uint(self.epoch_start, "epoch_start", high=2**64)
        check_uint(self.committee_size, "committee_size", low=1, high=MAX_COMMITTEE + 1)
        check_uint(self.score_threshold, "score_threshold", high=SCORE_SCALE + 1)
        check_uint(self.stake_slash_fraction, "stake_slash_fraction", low=1, high=SCORE_SCALE + 1)
        check_uint(self.earnings_slash_fraction, "earnings_slash_fraction", high=SCORE_SCALE + 1)

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


class Attestations(ContractHandle):
    """One deployed ``Attestations``. Reads need no account; writes (``attest``) are signed by ``account``.

    A revert raises the contract's custom error (or the registry's or payment contract's, which the quorum-reaching
    attestation calls) as a :class:`~ledger.ContractRevert` subclass with its decoded arguments.
    """

    CONTRACT = _CONTRACT
    #: The quorum-reaching attestation calls both slashers: decode their errors too.
    DECODES_ALSO = ("NodeRegistry", "PaymentChannels")

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
        address, epoch = checksum(node, param="node"), check_uint(epoch, "epoch")
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
            checksum(verifier, param="verifier"), checksum(node, param="node"), check_uint(epoch, "epoch")
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

    # -- writes ------------------------------------------------------------------------------------------------

    def attest(self, node: str, epoch: int, score: int, evidence_hash: bytes) -> TxReceipt:
        """Attest ``node``'s ``score`` (fixed-point, [0, SCORE_SCALE]) for ``epoch`` as the signer (a verifier).

        The receipt's events are ``("AttestationSubmitted",)``, or for the quorum-reaching one also
        ``"EpochFinalized"``, ``"ReputationUpdated"`` and, when the median fails, ``"NodePenalized"``.
        """
        fn = self._contract.functions.attest(
            checksum(node, param="node"),
            check_uint(epoch, "epoch"),
            check_uint(score, "score", high=2**32),
            check_bytes32(evidence_hash, "evidence_hash"),
        )
        # Estimated below quorum, an attestation may be mined after another verifier's and become the one that
        # finalizes and slashes (170-187k gas against 154k; bench/gas.py): send with the worst case as the floor.
        return self._send(fn, gas_floor=ATTEST_GAS_FLOOR)

    # -- internals ---------------------------------------------------------------------------------------------
