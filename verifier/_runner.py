"""The ``Verifier`` service: one loop over epochs that audits model nodes through the ``Client`` and attests on chain.

Per epoch (the contract's clock, ``Attestations.epoch_start/epoch_length``):

1. the epoch seed (``verifier._epoch``): the verifier's deterministic signature over a block hash no node could
   know in advance, so neither a node nor the verifier itself can steer which nodes are audited or with what;
2. the targets: registered, active (not jailed, bonded) model nodes serving the reference model, drawn from the
   seed; jailed or deregistered nodes are skipped (their stake already answered for them);
3. for each target a few challenges, prompts from the user distribution (``verifier._prompts``), each with a fresh
   seed and user-like sampling parameters, sent at the times of a Poisson process spread over the first
   ``send_window`` of the epoch (users arrive that way), through the ``Client`` pinned to the target: the same
   message types, paths, heartbeat fetches and payment channel (the verifier's own wallet) as any user's request;
4. each answer (tokens, per-token log-probs, finish reason) is scored by ``verifier._scoring.Scorer`` on the local
   reference engine, and fed, challenge by challenge, to the node's sequential (CUSUM) state, persisted in the state
   directory after each epoch so that a restart neither forgets a cheater nor counts an epoch twice;
5. the evidence (challenges, answers, scores) goes to the evidence store by its keccak hash, and the epoch score
   with that hash is attested (``ledger.Attestations.attest``) while the contract still accepts it.

Unanswered audits (decided here). A model node cannot tell an audit from a user's request, so dropping an audit
means dropping users' requests as well (which costs it their payments and, through the clients' own load
measurements, their traffic); but dropping must not be a way out of verification either. Each challenge is retried
inside the epoch (same prompt, same node, new relay paths: what a user's client does) until ``retry_grace`` after
the epoch's end. What stays unanswered is never scored as a failed challenge: a timeout can be the network's, a
relay's, or the verifier's own (its wallet admits one request per channel at a time, and an overloaded verifier
times out its own audits — measured: a demo verifier sending ~70 audits in 8 s on two busy cores timed out most of
them at an honest node); feeding that to the CUSUM would slash honest nodes. Instead:

- an epoch in which the node answered *none* of its challenges is an *unresponsive* epoch; after
  ``unresponsive_epochs`` of them in a row (3 by default) the verifier attests a failing score (the threshold minus
  one, at most), so a node that stops answering while staying registered is slashed within a few epochs, while an
  honest node that answered anything at all, or was down for an epoch or two, is not;
- an unresponsive epoch before that, with no alarm raised, is not attested (abstain: no evidence either way); with
  an alarm already raised it is attested from the alarm (the evidence of earlier epochs stands);
- a node jailed or deregistered during the epoch (the directory stops listing it) is not retried any more.

Every log line is structured (``key=value``) and never holds prompt or answer text, seeds or keys.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node.overlay import NoModelNode
from verifier._calibration import Calibration
from verifier._epoch import (
    MAX_NODES,
    AnchorMismatch,
    AuditPolicy,
    EpochPlan,
    EpochSeed,
    Web3Blocks,
    find_anchor_block,
    plan_epoch,
    sign_epoch_seed,
)
from verifier._errors import EvidenceTooLarge, InvalidVerifierInput, VerifierError
from verifier._evidence import EvidenceStore
from verifier._prompts import SALT_BYTES, ChallengeGenerator, ChallengeRequest, PromptDistribution, salt_commitment
from verifier._scoring import MAX_CHARS_PER_TOKEN, Answer, Challenge, ChallengeScore, Scorer
from verifier._sequential import CusumParams, SequentialTest, design_cusum

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

    from ledger import Attestations, IndexedNode
    from node.client import Client

log = logging.getLogger(__name__)

#: Fixed-point one of the attestation contract (1e6 = 1.0).
SCALE = 1_000_000
#: Attestation transactions sent for one verdict when one fails on chain without a reason (see ``_attest``).
ATTEST_TRIES = 3
#: State file format version.
STATE_VERSION = 1
#: Most challenges per node per epoch (bounds the evidence record and the epoch's traffic).
MAX_CHALLENGES_PER_NODE = 64
#: Failure reasons kept per challenge in the evidence record (``tries`` counts them all): a node that answers every
#: try with an error line at once must not grow the record past the store's bound.
MAX_FAILURES_KEPT = 16
#: Longest failure reason kept or logged, characters (a peer's error code is its own text).
MAX_REASON_CHARS = 64

#: Returns the registry's nodes as indexed now (``ledger.IndexedNode``s).
NodeSource = Callable[[], Awaitable[Sequence["IndexedNode"]]]


class NotAVerifier(VerifierError):
    """The account has no active verifier node in the registry: only registered, staked verifiers may attest."""

    code = "verifier_not_registered"

    def __init__(self, *, account: str, reason: str) -> None:
        self.account = account
        self.reason = reason
        super().__init__(
            f"{account} {reason}: register it with `ps-node register --role verifier --stake ...` (and `ps-node "
            "unjail` / `ps-node stake add` when jailed or under the minimum) before `ps-verifier run`"
        )


def check_verifier(registry: Any, account: str) -> None:
    """Raise :class:`NotAVerifier` unless ``account`` is a registered, active (bonded, staked, unjailed) verifier.

    Checked before any audit is sent: a verifier that cannot attest would pay for audits nobody hears about.
    """
    from ledger import Role

    node = registry.get_node(account)
    if node is None:
        raise NotAVerifier(account=account, reason="is not registered")
    if node.role is not Role.VERIFIER:
        raise NotAVerifier(account=account, reason=f"is registered as a {node.role.name.lower()}, not a verifier")
    if not node.active:
        why = "jailed" if node.jailed else "unbonding or below the verifier minimum stake"
        raise NotAVerifier(account=account, reason=f"is a verifier but not active ({why})")


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifierConfig:
    """How a verifier audits; validated on construction."""

    state_dir: Path
    """Where the sequential state (``state.json``) and the evidence store live."""
    model_dir: Path
    """The reference model folder (what the audited nodes claim to serve)."""
    mean_challenges: float = 4.0
    """Mean challenges per audited node per epoch (a Poisson count, at least 1), in (0, 64]."""
    min_challenges: int = 1
    """Fewest challenges per audited node per epoch, 1..max_challenges (each audited node yields evidence)."""
    max_challenges: int = 16
    """Most challenges per audited node per epoch, 1..64."""
    sample_size: int | None = None
    """Nodes audited per epoch, 1..10,000 (None: every active model node of the model while there are at most
    10,000, a seeded uniform sample of 10,000 beyond; see ``verifier._epoch``)."""
    max_prompt_chars: int = 3_600
    """Longest challenge prompt, characters, 64..65536 (keep prompt + answer inside the model's context)."""
    retry_grace: float = 0.3
    """How long after the epoch's end unanswered challenges are still retried, as a fraction of the epoch length,
    in (0, 0.9): the attestation must still fit before the contract stops accepting it (the end of the next epoch)."""
    retry_backoff_s: float = 0.2
    """Pause before a challenge's first retry, seconds (> 0); it doubles with each failed try in a row."""
    retry_backoff_max_s: float = 10.0
    """Longest pause between two tries of a challenge, seconds (>= retry_backoff_s): a node or a wallet that fails
    for a whole epoch (``WalletExhausted``) costs a few tries and log lines, not one every 0.2 s."""
    request_timeout_s: float = 30.0
    """Longest one try of a challenge may take, seconds (> 0)."""
    unresponsive_epochs: int = 3
    """Unresponsive epochs in a row after which the verifier attests a failing score, >= 1."""
    anchor_poll_s: float = 0.25
    """Pause between reads while the epoch's anchor block is not mined yet, seconds (> 0)."""
    anchor_confirmations: int = 2
    """Blocks mined on top of the epoch's anchor before it seeds the epoch, 0..64: a reorganisation of the anchor
    after seeding would leave the evidence naming a block the chain no longer has (0: seed at once; tests)."""
    epoch_wait_timeout_s: float = 3_600.0
    """Longest the loop waits for the next epoch to start, seconds (> 0), beyond one epoch length: a contract
    with epochs longer than this is still served (the wait before an epoch is at most its length)."""

    def __post_init__(self) -> None:
        checks: tuple[tuple[str, object, bool, str], ...] = (
            ("mean_challenges", self.mean_challenges, 0 < self.mean_challenges <= 64, "(0, 64]"),
            ("max_challenges", self.max_challenges, 1 <= self.max_challenges <= MAX_CHALLENGES_PER_NODE, "1..64"),
            (
                "min_challenges",
                self.min_challenges,
                1 <= self.min_challenges <= self.max_challenges,
                "1..max_challenges",
            ),
            (
                "sample_size",
                self.sample_size,
                self.sample_size is None or 1 <= self.sample_size <= MAX_NODES,
                f"None or 1..{MAX_NODES}",
            ),
            ("max_prompt_chars", self.max_prompt_chars, 64 <= self.max_prompt_chars <= 65_536, "64..65536"),
            ("retry_grace", self.retry_grace, 0.0 < self.retry_grace < 0.9, "(0, 0.9)"),
            ("retry_backoff_s", self.retry_backoff_s, self.retry_backoff_s > 0, "positive"),
            (
                "retry_backoff_max_s",
                self.retry_backoff_max_s,
                self.retry_backoff_max_s >= self.retry_backoff_s,
                "at least retry_backoff_s",
            ),
            ("request_timeout_s", self.request_timeout_s, self.request_timeout_s > 0, "positive"),
            ("unresponsive_epochs", self.unresponsive_epochs, self.unresponsive_epochs >= 1, "at least 1"),
            ("anchor_poll_s", self.anchor_poll_s, self.anchor_poll_s > 0, "positive"),
            ("anchor_confirmations", self.anchor_confirmations, 0 <= self.anchor_confirmations <= 64, "0..64"),
            ("epoch_wait_timeout_s", self.epoch_wait_timeout_s, self.epoch_wait_timeout_s > 0, "positive"),
        )
        for param, value, ok, expected in checks:
            if not ok:
                raise InvalidVerifierInput(param, value, expected)

    @property
    def state_file(self) -> Path:
        """The sequential state, one JSON file."""
        return self.state_dir / "state.json"

    @property
    def evidence_dir(self) -> Path:
        """The evidence store's folder."""
        return self.state_dir / "evidence"


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeVerdict:
    """What the verifier did about one node in one epoch (no private data: safe to print and log)."""

    node: str
    """The model node's operator address."""
    sent: int
    """Challenges scheduled."""
    answered: int
    """Challenges answered (after retries)."""
    tries: int
    """Tries in all (a retry counts)."""
    scores: tuple[float, ...]
    """Per-challenge scores of the answered challenges, 0..1, in send order."""
    score: int | None
    """The attested epoch score, fixed-point (None: not attested)."""
    alarm: bool
    """Whether the node's sequential test is in alarm after this epoch."""
    unresponsive_streak: int
    """Unresponsive epochs in a row, this one included."""
    outcome: str
    """``attested``, ``finalized`` (this attestation reached quorum), ``penalized`` (and slashed),
    ``already_attested``, ``epoch_finalized`` (quorum was reached without it), ``too_late``, ``abstained``,
    ``attest_failed`` (the transaction failed; logged), ``evidence_too_large`` (not stored, not attested; logged),
    ``failed`` (concluding the node failed otherwise, e.g. its state refused: not attested; logged)."""
    evidence_hash: str = ""
    """0x keccak of the evidence record ("" when none was stored)."""
    tx_hash: str = ""
    """The attestation's transaction ("" when none was mined)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EpochReport:
    """One epoch's audits."""

    epoch: int
    """The contract's epoch number."""
    verdicts: tuple[NodeVerdict, ...]
    """One per audited node."""
    skipped: tuple[str, ...] = ()
    """Model nodes of the model not audited: jailed, unbonding or deregistered."""


@dataclass(slots=True)
class _NodeState:
    unresponsive_streak: int = 0
    last_epoch: int = -1


@dataclass(slots=True)
class _Try:
    challenge: Challenge
    request: ChallengeRequest
    send_at: float
    send_at_ms: int
    tries: int = 0
    answer: Answer | None = None
    score: ChallengeScore | None = None
    failures: list[str] = field(default_factory=list)


def _hex(data: bytes) -> str:
    return "0x" + data.hex()


def _checksum(address: str) -> str:
    from eth_utils.address import to_checksum_address

    return str(to_checksum_address(address))


def _model_hex(model: object) -> str:
    """An indexed node's model id as lower-case 0x-hex (raw 32 bytes or already text)."""
    return _hex(model) if isinstance(model, bytes) else str(model).lower()


class EpochPlanner:
    """Each epoch's audit plan from the verifier's config and seed; says once when the registry outgrew a whole
    audit (``verifier._epoch.MAX_NODES`` model nodes) and each epoch audits a seeded sample instead."""

    def __init__(self, config: VerifierConfig) -> None:
        self.policy = AuditPolicy(
            mean_challenges=config.mean_challenges,
            min_challenges=config.min_challenges,
            max_challenges=config.max_challenges,
            sample_size=config.sample_size,
        )
        self._told = False

    async def plan(
        self, seed: EpochSeed, *, epoch: int, epoch_start: int, epoch_length: int, nodes: Sequence[str]
    ) -> EpochPlan:
        """The plan of ``epoch`` over the active model nodes ``nodes``, drawn in a worker thread (thousands of
        keccak draws and checksums: about a second for 20,000 nodes, which the event loop must not wait out)."""
        plan = await asyncio.to_thread(
            plan_epoch,
            seed.seed,
            epoch=epoch,
            epoch_start=epoch_start,
            epoch_length=epoch_length,
            nodes=nodes,
            policy=self.policy,
            not_before=seed.anchor.timestamp,
        )
        if plan.sampled and self.policy.sample_size is None and not self._told:
            self._told = True
            log.warning(
                "verifier epoch=%d nodes=%d above the %d one plan audits: each epoch audits a uniform sample of %d "
                "drawn from its seed (set sample_size to choose another size)",
                epoch,
                plan.candidates,
                MAX_NODES,
                len(plan.audited),
            )
        return plan


class Verifier:
    """Audits model nodes epoch by epoch and attests their scores (see the module docstring).

    ``client`` sends the audits (its wallet pays them, as a user's would: give it a payer key of its own, not the
    verifier's registered key, or the channel names the auditor); ``attestations`` is signed by the verifier's
    registered account; ``nodes`` reads the registry (fresh each epoch); ``engine`` is the reference engine for
    ``model_id``. The caller owns the client and the engine (and closes them).
    """

    def __init__(
        self,
        config: VerifierConfig,
        *,
        account: LocalAccount,
        attestations: Attestations,
        nodes: NodeSource,
        client: Client,
        engine: Any,
        model_id: str,
        calibration: Calibration | None = None,
        cusum: CusumParams | None = None,
    ) -> None:
        """``calibration``: the tolerances and honest scores (default: the shipped ``Calibration.default()``);
        ``cusum``: the sequential test's design (default: ``design_cusum`` on the calibration's honest scores). A
        state directory that already holds a state keeps the design it was started with."""
        self.config = config
        self.account = account
        self.attestations = attestations
        self._nodes = nodes
        self.client = client
        self.engine = engine
        self.model_id = model_id.lower()
        if calibration is None:
            calibration = Calibration.default()
        self.scorer = Scorer(engine, calibration)
        config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.evidence = EvidenceStore(config.evidence_dir)
        self.sequential, self._state = self._load_state(calibration, cusum)
        self._salt = self._load_salt()
        self._conclude_lock = asyncio.Lock()
        self._planner = EpochPlanner(config)
        self._threshold: tuple[int, int] | None = None  # (epoch, the contract's score threshold then)

    # -- state ---------------------------------------------------------------------------------------------------

    def _load_state(
        self, calibration: Calibration, cusum: CusumParams | None
    ) -> tuple[SequentialTest, dict[str, _NodeState]]:
        path = self.config.state_file
        if path.exists():
            raw = json.loads(path.read_text())
            if not isinstance(raw, dict) or raw.get("version") != STATE_VERSION:
                raise InvalidVerifierInput("state_file", str(path), f"a version {STATE_VERSION} verifier state")
            nodes = {
                node: _NodeState(
                    unresponsive_streak=int(entry.get("unresponsive_streak", 0)),
                    last_epoch=int(entry.get("last_epoch", -1)),
                )
                for node, entry in raw.get("nodes", {}).items()
            }
            return SequentialTest.from_json(raw["sequential"]), nodes
        if cusum is None:
            cusum = design_cusum(calibration.honest(), challenges_per_epoch=self.config.max_challenges)
        return SequentialTest(params=cusum), {}

    def _save_state(self) -> None:
        """Write the state atomically (a crash leaves the old file or the new one, never half of either)."""
        raw = {
            "version": STATE_VERSION,
            "sequential": self.sequential.to_json(),
            "nodes": {
                node: {"unresponsive_streak": state.unresponsive_streak, "last_epoch": state.last_epoch}
                for node, state in sorted(self._state.items())
            },
        }
        tmp = self.config.state_file.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as out:
            out.write(json.dumps(raw, sort_keys=True))
            out.flush()
            os.fsync(out.fileno())  # else a power loss may leave the renamed file empty, and the next start refuses it
        os.replace(tmp, self.config.state_file)
        folder = os.open(self.config.state_file.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # the rename itself
        finally:
            os.close(folder)

    def node_state(self, node: str) -> _NodeState:
        """The persisted bookkeeping of ``node`` (a fresh one when never audited)."""
        return self._state.setdefault(_checksum(node), _NodeState())

    # -- chain clock ---------------------------------------------------------------------------------------------

    def _chain_now(self) -> float:
        """The chain's time now: the pending block's timestamp (anvil's time offset included), else the latest's."""
        w3 = self.attestations.w3
        try:
            return float(w3.eth.get_block("pending")["timestamp"])
        except Exception:  # a node without "pending": the latest block is the best clock it offers
            return float(w3.eth.get_block("latest")["timestamp"])

    async def _epoch_times(self) -> tuple[int, int, float]:
        """(epoch start, epoch length, chain time minus wall time now)."""
        start, length, now = await asyncio.to_thread(
            lambda: (self.attestations.epoch_start(), self.attestations.epoch_length(), self._chain_now())
        )
        return start, length, now - time.time()

    # -- the loop ------------------------------------------------------------------------------------------------

    async def run(self, epochs: int | None = None, *, on_epoch: Callable[[EpochReport], None] | None = None) -> None:
        """Audit ``epochs`` whole epochs (None: until cancelled), each from its start.

        An epoch's sends are spread over all of it and its retries and attestation run into the next, so epoch
        ``e + 1`` starts while ``e`` concludes: at most two run at once, and they conclude in order. An epoch
        already under way when the loop starts is skipped (joining late would bunch its schedule).
        """
        start, length, offset = await self._epoch_times()
        epoch = int((time.time() + offset - start) // length) + 1
        running: list[asyncio.Task[None]] = []

        async def one(epoch: int) -> None:
            try:
                report = await self.run_epoch(epoch)
            except VerifierError:
                raise  # the verifier's own configuration or state is wrong: stop
            except Exception as exc:  # the chain or the network failed this epoch: the next one starts afresh
                log.error("verifier epoch=%d failed=%s: %s", epoch, type(exc).__name__, exc)
                return
            if on_epoch is not None:
                on_epoch(report)  # as soon as it concluded (epochs conclude in order: see run_epoch)

        try:
            launched = 0
            while epochs is None or launched < epochs:
                wait = start + epoch * length - (time.time() + offset)
                if wait > self.config.epoch_wait_timeout_s + length:
                    raise InvalidVerifierInput("epoch_wait_timeout_s", wait, "the next epoch starts later than this")
                if wait > 0:
                    await asyncio.sleep(wait)
                for task in [t for t in running if t.done()]:
                    running.remove(task)
                    task.result()  # re-raises an epoch's failure
                running.append(asyncio.create_task(one(epoch)))
                launched, epoch = launched + 1, epoch + 1
                while len(running) >= 2:
                    await running.pop(0)
            while running:
                await running.pop(0)
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def run_epoch(self, epoch: int) -> EpochReport:
        """Audit epoch ``epoch`` and attest (while the contract accepts it: until the end of the next epoch).

        Call it at (or shortly after) the epoch's start: the plan's send times are absolute, and those already past
        are sent at once.
        """
        start, length, offset = await self._epoch_times()
        epoch_begin = start + epoch * length
        nodes = await self._nodes()
        serving = [n for n in nodes if _is_model(n) and _model_hex(n.model_id) == self.model_id]
        skipped = tuple(n.operator for n in serving if not n.active)
        for operator in skipped:
            log.info("verifier skip epoch=%d node=%s reason=not_active", epoch, operator)
        seed = await self._seed(epoch, epoch_begin, epoch_begin + length, offset)
        if seed is None:
            log.warning("verifier epoch=%d no anchor block before the epoch ended: nothing audited", epoch)
            return EpochReport(epoch=epoch, verdicts=(), skipped=skipped)
        policy = self._planner.policy
        plan = await self._planner.plan(
            seed, epoch=epoch, epoch_start=start, epoch_length=length, nodes=[n.operator for n in serving if n.active]
        )
        tries = {node: self._challenges(seed.seed, plan.for_node(node), epoch_begin - offset) for node in plan.audited}
        log.info(
            "verifier epoch=%d audited=%d of=%d challenges=%d anchor=%d",
            epoch,
            len(plan.audited),
            plan.candidates,
            len(plan.challenges),
            seed.anchor.number,
        )
        retry_until = epoch_begin + length * (1 + self.config.retry_grace) - offset
        await asyncio.gather(*(self._send(epoch, node, t, retry_until) for node, ts in tries.items() for t in ts))
        verdicts = []
        async with self._conclude_lock:  # epochs conclude one at a time, in order (the sequential state is shared)
            self._forget_gone(epoch, nodes)
            for node in plan.audited:
                try:
                    verdicts.append(await self._conclude(epoch, node, tries[node], seed, plan, policy))
                except Exception as exc:  # one node's verdict failing (even a VerifierError) is not the others' end
                    log.error("verifier conclude epoch=%d node=%s failed=%s: %s", epoch, node, type(exc).__name__, exc)
                    verdicts.append(_failed_verdict(node, tries[node], alarm=self.sequential.state(node).alarmed))
            self._save_state()
        return EpochReport(epoch=epoch, verdicts=tuple(verdicts), skipped=skipped)

    def _forget_gone(self, epoch: int, view: Sequence[IndexedNode]) -> None:
        """Drop the sequential state and bookkeeping of nodes no longer registered (absent from the registry view
        or deregistered): nodes come and go, and the state is bounded (``verifier._sequential.MAX_NODES``), so
        without this a verifier would refuse new nodes after enough had left. A node that registers again starts
        afresh, as a new operator would: it has unbonded meanwhile, and its stake answered for what it did before.
        An empty view is not trusted to mean that every node left (a fresh index), and forgets nothing."""
        registered = {_checksum(n.operator) for n in view if getattr(n, "status", "active") != "deregistered"}
        if not registered:
            return
        gone = (set(self.sequential.nodes) | set(self._state)) - registered
        for node in sorted(gone):
            self.sequential.reset(node)
            self._state.pop(node, None)
        if gone:
            log.info("verifier epoch=%d forgot=%d deregistered nodes", epoch, len(gone))

    # -- per epoch: seed and challenges --------------------------------------------------------------------------

    async def _seed(self, epoch: int, begin: int, end: int, offset: float) -> EpochSeed | None:
        """The verifier's signed seed for ``epoch``, once its anchor block is mined (None if not before ``end``)."""
        w3 = self.attestations.w3
        blocks = Web3Blocks(w3)
        while True:
            try:
                anchor = await asyncio.to_thread(
                    find_anchor_block, blocks, begin, confirmations=self.config.anchor_confirmations
                )
            except AnchorMismatch:  # the chain reorganised under the search: the chain's doing, ask again
                log.warning("verifier epoch=%d anchor search saw a reorganisation: searching again", epoch)
                anchor = None
            if anchor is not None:
                break
            if time.time() + offset >= end:
                return None
            await asyncio.sleep(self.config.anchor_poll_s)
        chain_id = await asyncio.to_thread(lambda: int(w3.eth.chain_id))
        return sign_epoch_seed(
            self.account, chain_id=chain_id, attestations=self.attestations.address, epoch=epoch, anchor=anchor
        )

    def _load_salt(self) -> bytes:
        """The verifier's private prompt salt (``verifier._prompts``), created on first use (mode 0600)."""
        path = self.config.state_dir / "prompt-salt"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(secrets.token_bytes(SALT_BYTES))
        salt = path.read_bytes()
        if len(salt) != SALT_BYTES:
            raise InvalidVerifierInput("prompt-salt", f"{len(salt)} bytes", f"exactly {SALT_BYTES} bytes")
        return salt

    def _challenges(self, seed: bytes, planned: Sequence[Any], begin_wall: float) -> list[_Try]:
        """The challenges planned ones stand for: prompts and parameters from the user distribution, each keyed by
        its plan entry and the verifier's salt, sent at its planned time."""
        # Trimmed to the reference model's context with its tokenizer (digits are about a token each: the
        # character bound alone let 3,600 characters of additions overflow a 2,048-token context).
        tokenize = getattr(self.engine, "tokenize", None)
        context = getattr(self.engine, "max_context", None)
        distribution = PromptDistribution(
            max_prompt_chars=self.config.max_prompt_chars,
            tokenize=tokenize if callable(tokenize) and isinstance(context, int) else None,
            context_tokens=context if callable(tokenize) and isinstance(context, int) else None,
        )
        generator = ChallengeGenerator(seed, self._salt, distribution)
        out = []
        for p in planned:
            drawn = generator.challenge(p.key)
            challenge = Challenge(
                prompt=drawn.prompt,
                max_tokens=drawn.max_tokens,
                temperature=drawn.temperature,
                top_p=drawn.top_p,
                seed=drawn.seed,
                stop=drawn.stop,
            )
            out.append(
                _Try(
                    challenge=challenge,
                    request=drawn,
                    send_at=begin_wall + p.send_at_ms / 1000.0,
                    send_at_ms=p.send_at_ms,
                )
            )
        return out

    # -- per challenge -------------------------------------------------------------------------------------------

    async def _send(self, epoch: int, node: str, attempt: _Try, retry_until: float) -> None:
        """Send one challenge at its time, retrying until answered or ``retry_until`` (wall clock)."""
        delay = attempt.send_at - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        request = attempt.request.completion_request(self.model_id)  # built exactly as a user's request is
        backoff = self.config.retry_backoff_s
        while True:
            attempt.tries += 1
            sent = time.monotonic()
            # An answer must come by the retry deadline too: the epoch's score has to be attested after it.
            budget = min(self.config.request_timeout_s, max(0.5, retry_until - time.time()))
            try:
                async with asyncio.timeout(budget):
                    done = await self.client.complete(request, to=node)
            except Exception as exc:  # a network or node failure: retried below, never scored as cheating
                reason = _reason(getattr(exc, "code", None) or type(exc).__name__)
                if len(attempt.failures) < MAX_FAILURES_KEPT:
                    attempt.failures.append(reason)
                # The first failure at INFO, repeats at DEBUG: one failing for a whole epoch is one line, not 1,000.
                log.log(
                    logging.INFO if attempt.tries == 1 else logging.DEBUG,
                    "verifier audit epoch=%d node=%s try=%d failed=%s",
                    epoch,
                    node,
                    attempt.tries,
                    reason,
                )
                if isinstance(exc, NoModelNode):
                    return  # no longer routable (jailed, unbonding, deregistered meanwhile): a user could not reach it
                # The last pause is cut short so that one more try still fits before the deadline.
                pause = min(backoff, retry_until - time.time() - self.config.retry_backoff_s)
                if pause <= 0:
                    return
                await asyncio.sleep(pause)
                backoff = min(backoff * 2, self.config.retry_backoff_max_s)
                continue
            attempt.answer = Answer(
                text=done.text,
                token_ids=done.token_ids,
                logprobs=done.logprobs,
                finish_reason=done.finish_reason,
            )
            log.info(
                "verifier audit epoch=%d node=%s try=%d tokens=%d finish=%s ms=%.0f",
                epoch,
                node,
                attempt.tries,
                len(done.token_ids),
                done.finish_reason,
                (time.monotonic() - sent) * 1e3,
            )
            # Scored now, while the epoch goes on: the attestation must not wait for a backlog of replays.
            try:
                attempt.score = await self.scorer.score(attempt.challenge, attempt.answer)
            except Exception as exc:  # the verifier's own engine failed: no evidence either way, not the node's fault
                log.warning("verifier score epoch=%d node=%s failed=%s", epoch, node, type(exc).__name__)
                return
            log.info(
                "verifier score epoch=%d node=%s temperature=%g score=%.4f",
                epoch,
                node,
                attempt.challenge.temperature,
                attempt.score.score,
            )
            return

    # -- per node: score, state, evidence, attestation -----------------------------------------------------------

    async def _score_threshold(self, epoch: int) -> int:
        """The contract's passing score, read once per epoch's conclusion (not once per audited node: 10,000 reads
        of one value for a sampled plan)."""
        if self._threshold is None or self._threshold[0] != epoch:
            self._threshold = (epoch, await asyncio.to_thread(self.attestations.score_threshold))
        return self._threshold[1]

    async def _conclude(
        self, epoch: int, node: str, tries: list[_Try], seed: EpochSeed, plan: EpochPlan, policy: AuditPolicy
    ) -> NodeVerdict:
        node = _checksum(node)
        state = self.node_state(node)
        answered = [t for t in tries if t.answer is not None]
        scored = [(t, t.score) for t in answered if t.score is not None]
        fresh = state.last_epoch < epoch  # a restart inside an epoch must not feed its scores twice
        if fresh:
            self.sequential.observe(node, [s.score for _, s in scored])
            unresponsive = not answered
            state.unresponsive_streak = state.unresponsive_streak + 1 if unresponsive else 0
            state.last_epoch = epoch
        cusum = self.sequential.state(node)
        alarm = cusum.alarmed
        score = self.sequential.epoch_score(node)
        threshold = await self._score_threshold(epoch)
        if state.unresponsive_streak >= self.config.unresponsive_epochs:
            # Not answering at all, epoch after epoch, is not free: a failing score.
            score = min(score, threshold - 1)
        verdict = NodeVerdict(
            node=node,
            sent=len(tries),
            answered=len(answered),
            tries=sum(t.tries for t in tries),
            scores=tuple(round(s.score, 6) for _, s in scored),
            alarm=alarm,
            unresponsive_streak=state.unresponsive_streak,
            score=None,
            outcome="abstained",
        )
        if not answered and not alarm and state.unresponsive_streak < self.config.unresponsive_epochs:
            log.info("verifier abstain epoch=%d node=%s answered=0", epoch, node)
            return verdict
        record = {
            "kind": "planetserve-audit",
            "version": 1,
            "verifier": self.account.address,
            "node": node,
            "model": self.model_id,
            "epoch": epoch,
            "score": score,
            "alarm": alarm,
            "unresponsive_streak": state.unresponsive_streak,
            "sequential": cusum.to_dict(),
            "epoch_start": plan.epoch_start,
            "epoch_length": plan.epoch_length,
            "policy": {
                "mean_challenges": policy.mean_challenges,
                "min_challenges": policy.min_challenges,
                "max_challenges": policy.max_challenges,
            },
            "salt_commitment": _hex(salt_commitment(self._salt)),
            "seed": {
                "signature": _hex(seed.signature),
                "seed": _hex(seed.seed),
                "chain_id": seed.chain_id,
                "attestations": seed.attestations,
                "anchor": {
                    "number": seed.anchor.number,
                    "hash": _hex(seed.anchor.hash),
                    "timestamp": seed.anchor.timestamp,
                },
            },
            "challenges": [
                {
                    "send_at_ms": t.send_at_ms,
                    "prompt": t.challenge.prompt,
                    "max_tokens": t.challenge.max_tokens,
                    "temperature": t.challenge.temperature,
                    "top_p": t.challenge.top_p,
                    "stop": list(t.challenge.stop),
                    "seed": t.challenge.seed,
                    "tries": t.tries,
                    "failures": t.failures,
                    "answer": _answer_record(t),
                    "score": next((s.to_dict() for tt, s in scored if tt is t), None),
                }
                for t in tries
            ],
        }
        try:
            evidence_hash = await asyncio.to_thread(self.evidence.put, record)
        except EvidenceTooLarge as exc:  # not the node's to decide: the other nodes' verdicts still go out
            log.error("verifier evidence epoch=%d node=%s too_large=%d: not attested", epoch, node, exc.size)
            return replace(verdict, outcome="evidence_too_large")
        try:
            outcome, tx_hash = await self._attest(epoch, node, score, evidence_hash)
        except Exception as exc:  # kept in the evidence store; the other nodes' verdicts still go out
            log.error("verifier attest epoch=%d node=%s failed=%s: %s", epoch, node, type(exc).__name__, exc)
            outcome, tx_hash = "attest_failed", getattr(exc, "tx_hash", None) or ""
        return replace(verdict, score=score, outcome=outcome, evidence_hash=_hex(evidence_hash), tx_hash=tx_hash)

    async def _attest(self, epoch: int, node: str, score: int, evidence_hash: bytes) -> tuple[str, str]:
        """Attest; a revert that only says the work is moot (finalized, already attested, too late) is logged.

        A transaction that failed on chain without a revert reason is sent again (up to ``ATTEST_TRIES`` in all):
        another verifier's attestation mined between this one's gas estimate and its inclusion can turn it into
        the quorum-reaching one, whose median, reputation update and slashes need more gas than was estimated.
        """
        from ledger import ContractRevert, TransactionFailed

        moot = {
            "AttestationsEpochFinalized": "epoch_finalized",
            "AttestationsAlreadyAttested": "already_attested",
            "AttestationsEpochTooOld": "too_late",
        }
        for attempt in range(1, ATTEST_TRIES + 1):
            try:
                receipt = await asyncio.to_thread(self.attestations.attest, node, epoch, score, evidence_hash)
                break
            except ContractRevert as exc:
                if exc.error_name not in moot:
                    raise
                outcome = moot[exc.error_name]
                log.info("verifier attest epoch=%d node=%s score=%d outcome=%s", epoch, node, score, outcome)
                return outcome, exc.tx_hash or ""
            except TransactionFailed as exc:
                if attempt == ATTEST_TRIES:
                    raise
                log.info(
                    "verifier attest epoch=%d node=%s failed on chain (tx %s): sending again", epoch, node, exc.tx_hash
                )
        if "NodePenalized" in receipt.events:
            outcome = "penalized"
        elif "EpochFinalized" in receipt.events:
            outcome = "finalized"
        else:
            outcome = "attested"
        log.info(
            "verifier attest epoch=%d node=%s score=%d outcome=%s tx=%s", epoch, node, score, outcome, receipt.tx_hash
        )
        return outcome, receipt.tx_hash


def _failed_verdict(node: str, tries: list[_Try], *, alarm: bool) -> NodeVerdict:
    """The verdict of a node whose conclusion failed (logged): nothing attested, its scores as far as known."""
    return NodeVerdict(
        node=node,
        sent=len(tries),
        answered=sum(1 for t in tries if t.answer is not None),
        tries=sum(t.tries for t in tries),
        scores=tuple(round(t.score.score, 6) for t in tries if t.score is not None),
        score=None,
        alarm=alarm,
        unresponsive_streak=0,
        outcome="failed",
    )


def _reason(reason: object) -> str:
    """A failure reason fit for a log line and the record: printable, at most ``MAX_REASON_CHARS``."""
    return "".join(c if c.isprintable() else "?" for c in str(reason)[:MAX_REASON_CHARS])


def _answer_record(attempt: _Try) -> dict[str, Any] | None:
    """The answer as the evidence keeps it: a peer's bytes, so cut to what an answer to this challenge can be
    (``max_tokens`` tokens and log-probs, ``MAX_CHARS_PER_TOKEN`` characters a token; its score already says it was
    oversized), with the sizes it came with. Unbounded, one answer could push the record past the store's bound."""
    answer = attempt.answer
    if answer is None:
        return None
    tokens = attempt.challenge.max_tokens
    chars = MAX_CHARS_PER_TOKEN * tokens
    out: dict[str, Any] = {
        "text": answer.text[:chars],
        "token_ids": list(answer.token_ids[:tokens]),
        "logprobs": [x if math.isfinite(x) else None for x in answer.logprobs[:tokens]],
        "finish_reason": answer.finish_reason,
    }
    if len(answer.text) > chars or len(answer.token_ids) > tokens or len(answer.logprobs) > tokens:
        out["truncated"] = {
            "text_chars": len(answer.text),
            "tokens": len(answer.token_ids),
            "logprobs": len(answer.logprobs),
        }
    return out


def _is_model(node: IndexedNode) -> bool:
    from ledger import Role

    return node.role is Role.MODEL
