"""Forwarding policies: which model node gets a request (``docs/forwarding.md``).

A policy sees one :class:`NodeView` per candidate (what the client knows of it: reputation, the load in its last
signed heartbeat plus the client's own requests sent there since, the prompt's prefix affinity, and the node's speed
**as this client measured it**) and returns the index of its choice. Policies are pure and synchronous; the client
and the forwarding benchmark's simulation call the same code, and build their views with the same
:meth:`LoadTracker.view`.

``planetserve`` (ours):

1. drop nodes below the reputation floor;
2. price each node by the request's **marginal cost** there (:func:`marginal_cost`): its own time (:func:`estimate`)
   plus the delay it imposes on the requests already decoding there (:func:`externality`), divided by a reputation
   weight. Own time: the prefill wait, ``seconds_per_token x (queued_tokens + prompt_tokens - matched_tokens)``, plus
   ``max_tokens`` decode steps, ``u x (max_tokens + batch_share x overlap)``, where ``overlap`` is what the requests
   there generate meanwhile (``min(decode_backlog_tokens, running_requests x max_tokens)``), ``u`` the node's step
   time at a batch of one and ``batch_share`` the part of a step each further sequence adds (:class:`StepFit`,
   fitted from the node's own reports: a step costs ``c + d x batch``, ``batch_share = d / (c + d)``). Externality:
   ``u x batch_share x overlap``, each shared step made longer for one co-runner. The mean latency over all requests
   is the sum of the marginal costs, so minimising own time alone (the "selfish" estimate) lets a request join a
   node whose co-runners it slows more than it gains. ``u`` is the node's reported per-sequence time brought to a
   batch of one on the fitted line (the report is a step's time over its batch, which *falls* as the batch grows
   when part of a step is fixed: read as a constant it made a node decoding 2-3 requests look cheaper than one
   decoding a single request, the measured reason least-estimate routing lost to round robin on short prompts),
   averaged over the node's reports and times the client's own correction (its measured time per token of its
   replies over the prediction), so a node that under-reports its load is caught by its slow answers.
   ``seconds_per_token`` is the node's reported prefill speed (heartbeat v3) times the client's prefill correction
   (:meth:`LoadTracker.prefill_correction`), or, where the node reports none, the client's own EWMA of TTFT per
   token ahead;
3. exclude the most loaded fraction (``exclude_fraction``; 0 by default: measured, excluding the quarter with the
   highest cache-blind estimate removed the node holding a hot prefix and made every workload slower, since the
   affinity step already falls back to least load when that node's estimate, queue included, is too high);
4. among the rest, prefer the nodes holding the longest prefix of the prompt, unless even the best of them would
   take ``affinity_slack`` times longer than the least-loaded node (then fall back to least load);
5. sample: among the candidates whose estimate is within ``sample_slack`` of the cheapest, draw one weighted by
   reputation (and, with ``choices`` = d > 0, first sample d nodes: power of d choices). Independent clients on the
   same stale heartbeats then spread over the near-equal nodes instead of herding onto one; each client also adds
   the requests it sent since a heartbeat was issued (measured in ``bench/forwarding.py``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from node._line_fit import LineFit

#: Prompt tokens counted for the one scheduler step every first token waits for, however little of the prompt is
#: left to compute (the torch engine's step computes up to 512 tokens; half a step on average): without it a cached
#: prompt's TTFT, divided by its few uncached tokens, would make the node that cached it look slow per token.
STEP_TOKENS = 256
#: Reputation of a node no verifier has scored yet (until the attestation contract exists, every node's).
NEUTRAL_REPUTATION = 0.5


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeView:
    """One candidate model node as the client sees it for one request."""

    node_id: str
    """Registry id (operator address)."""
    reputation: float = NEUTRAL_REPUTATION
    """On-chain reputation in [0, 1]."""
    queued_tokens: int = 0
    """Prompt tokens still to prefill ahead of this request: as the node last reported, plus this client's own
    requests sent there since that report."""
    matched_tokens: int = 0
    """Leading prompt tokens the node's cache summary holds (a multiple of the chunk size)."""
    seconds_per_token: float = 1e-3
    """Seconds per prompt token ahead of the first token: the node's reported prefill speed times the client's
    correction (heartbeat v3), else the client's EWMA of the node's time to first token per prompt token ahead (its
    prior until measured)."""
    running_requests: int = 0
    """Requests queued or running there (reported, plus this client's own since the report)."""
    decode_backlog_tokens: int = 0
    """Tokens those requests still have to generate (reported, plus this client's own since the report)."""
    seconds_per_decode_token: float = 0.0
    """Seconds per generated token of a request decoding alone (the node's step time at a batch of one): its report,
    brought to a batch of one with :attr:`batch_share`, times the client's measured correction (0: unknown, the
    estimate then has no decode term)."""
    reported_decode_s: float = 0.0
    """The node's own report of it, before the correction (0: none; the client then used its own measurement)."""
    reported_prefill_s: float = 0.0
    """The node's own report of its prefill time per prompt token, seconds, before the client's correction (0: none;
    :attr:`seconds_per_token` is then the client's own TTFT-per-token EWMA)."""
    batch_share: float = 1.0
    """The share of a decode step's time that grows with the batch, in [0, 1] (:class:`StepFit`): a step over a
    batch of ``b`` costs ``seconds_per_decode_token x (1 - batch_share + batch_share x b)``. 1: a step's cost is
    proportional to its batch (processor sharing, the estimate before the fit); 0: batch-flat."""


class Policy(Protocol):
    """Chooses a model node for one request."""

    name: str

    def choose(self, views: Sequence[NodeView], prompt_tokens: int, rng: random.Random, max_tokens: int = 0) -> int:
        """Index into ``views`` (non-empty) of the chosen node for a prompt of ``prompt_tokens`` asking for up to
        ``max_tokens`` (0: not known, the decode term is left out)."""
        ...


class RoundRobin:
    """Each next request to the next node, whatever its state (the paper's baseline)."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, views: Sequence[NodeView], prompt_tokens: int, rng: random.Random, max_tokens: int = 0) -> int:
        index = self._next % len(views)
        self._next += 1
        return index


def _overlap(view: NodeView, max_tokens: int) -> int:
    """Tokens the requests already there generate while the new one decodes: ``sum(min(r_i, max_tokens))`` over their
    remaining lengths ``r_i``, bounded from the reported sum and count."""
    return min(view.decode_backlog_tokens, view.running_requests * max_tokens)


def estimate(view: NodeView, prompt_tokens: int, max_tokens: int) -> float:
    """Seconds the node would take to serve the request: prefill wait plus decode time (module docstring, step 2).

    The decode term is the request's ``max_tokens`` steps, each costing the node's step time at a batch of one plus
    ``batch_share`` of it per co-running sequence: ``u x (max_tokens + batch_share x overlap)``, ``overlap`` the
    tokens the requests already there generate meanwhile (at most ``max_tokens`` each). With ``batch_share`` 1 it
    is processor sharing, ``u x (max_tokens + overlap)``; with 0 the batch costs nothing and only the steps count.
    """
    uncached = max(0, prompt_tokens - view.matched_tokens)
    prefill = view.seconds_per_token * (view.queued_tokens + uncached + STEP_TOKENS)
    if max_tokens <= 0 or view.seconds_per_decode_token <= 0.0:
        return prefill
    share = view.batch_share * _overlap(view, max_tokens)
    return prefill + view.seconds_per_decode_token * (max_tokens + share)


def externality(view: NodeView, prompt_tokens: int, max_tokens: int) -> float:
    """Seconds the request adds to the requests already there, summed over them:

    - decode: each of the ``overlap`` steps it shares with one of them costs that one ``batch_share x u`` more (zero
      on a batch-flat node, whatever its backlog);
    - prefill: its uncached prompt is computed in the node's steps (chunked prefill), so every request queued or
      running there waits that long once more: ``seconds_per_token x uncached x running_requests``.

    Where a step's cost grows with the batch, or prompts are long, the request's own time (:func:`estimate`) is
    only part of its cost to everyone."""
    uncached = max(0, prompt_tokens - view.matched_tokens)
    prefill = view.seconds_per_token * uncached * view.running_requests
    if max_tokens <= 0 or view.seconds_per_decode_token <= 0.0:
        return prefill
    return prefill + view.seconds_per_decode_token * view.batch_share * _overlap(view, max_tokens)


def marginal_cost(view: NodeView, prompt_tokens: int, max_tokens: int) -> float:
    """The request's own time there plus the delay it imposes on the requests already there (what the policies
    minimise): the mean latency over all requests is the sum of these, so a selfish choice (own time only) lets a
    request join a node whose co-runners it slows more than it gains."""
    return estimate(view, prompt_tokens, max_tokens) + externality(view, prompt_tokens, max_tokens)


def with_known_decode(views: Sequence[NodeView]) -> list[NodeView]:
    """``views`` with each unknown decode speed (0: a node that has not decoded since it started, and that this
    client has not measured) set to the mean of the known ones.

    Left at 0, the estimate counts no decode time for such a node, so it looks several times cheaper than one that
    reports its real speed, and every next request goes to whichever node is still unknown, its cached prefix or
    not (as ``LoadTracker.seconds_per_token`` guards the prefill term)."""
    known = [v.seconds_per_decode_token for v in views if v.seconds_per_decode_token > 0.0]
    if not known or len(known) == len(views):
        return list(views)
    mean = sum(known) / len(known)
    return [v if v.seconds_per_decode_token > 0.0 else replace(v, seconds_per_decode_token=mean) for v in views]


class LeastLoad:
    """The node with the least estimated time for the request, its cache ignored (with ``choices`` = d > 0, the
    best of d sampled nodes)."""

    name = "least_load"

    def __init__(self, choices: int = 0, *, externality: bool = True) -> None:
        self.choices = choices
        self.externality = externality

    def choose(self, views: Sequence[NodeView], prompt_tokens: int, rng: random.Random, max_tokens: int = 0) -> int:
        views = with_known_decode(views)
        candidates = list(range(len(views)))
        if self.choices and len(candidates) > self.choices:
            candidates = rng.sample(candidates, self.choices)
        return min(
            candidates, key=lambda i: (_load(views[i], prompt_tokens, max_tokens, self.externality), rng.random())
        )


def _load(view: NodeView, prompt_tokens: int, max_tokens: int, external: bool = True) -> float:
    """The cost as if the node held none of the prompt (what "most loaded" and least load rank by)."""
    blind = replace(view, matched_tokens=0)
    return (marginal_cost if external else estimate)(blind, prompt_tokens, max_tokens)


class PrefixOnly:
    """The node holding the longest prefix of the prompt, ignoring load (ties at random)."""

    name = "prefix_only"

    def choose(self, views: Sequence[NodeView], prompt_tokens: int, rng: random.Random, max_tokens: int = 0) -> int:
        best = max(v.matched_tokens for v in views)
        return rng.choice([i for i, v in enumerate(views) if v.matched_tokens == best])


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanetServeSettings:
    """The tunables of :class:`PlanetServePolicy`."""

    reputation_floor: float = 0.2
    """Nodes below this reputation are never chosen."""
    exclude_fraction: float = 0.0
    """The most loaded fraction of candidates (by the cache-blind estimate) is excluded, at least one node always
    remaining. 0 by default: the node holding a popular prefix is the most loaded by that measure, so excluding it
    forced a full prefill elsewhere, which the estimate (queue included) had already judged dearer; in
    ``bench/forwarding.py`` 0.25 was slower than 0 on every workload (``docs/forwarding.md``)."""
    affinity_slack: float = 1.2
    """Affinity is preferred unless its best node's estimate exceeds the least-loaded node's by this factor."""
    sample_slack: float = 1.1
    """The final draw is among candidates whose estimate is within this factor of the cheapest (1: the cheapest;
    ties at random)."""
    externality: bool = True
    """Weigh each node by the request's marginal cost, its own time plus the delay it adds to the co-runners there
    (:func:`marginal_cost`); False: its own time only (the selfish estimate)."""
    choices: int = 0
    """Nodes sampled per decision before the estimate is consulted (power of d choices); 0 weighs every candidate.
    At scale the candidates are themselves a sample (the client weighs a bounded random subset plus the nodes
    holding its prefix)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.reputation_floor <= 1.0:
            raise ValueError("reputation_floor must be in [0, 1]")
        if not 0.0 <= self.exclude_fraction < 1.0:
            raise ValueError("exclude_fraction must be in [0, 1)")
        if self.affinity_slack < 1.0:
            raise ValueError("affinity_slack must be at least 1")
        if self.sample_slack < 1.0:
            raise ValueError("sample_slack must be at least 1")
        if self.choices < 0:
            raise ValueError("choices must be >= 0")


class NoEligibleNode(ValueError):
    """Every candidate is below the reputation floor."""


class PlanetServePolicy:
    """Reputation floor, load and decode estimate corrected by the client's own measurements, prefix affinity, and
    a randomized draw among near-best nodes."""

    name = "planetserve"

    def __init__(self, settings: PlanetServeSettings | None = None) -> None:
        self.settings = settings or PlanetServeSettings()

    @staticmethod
    def _weight(view: NodeView) -> float:
        # Neutral reputation weighs 1; a perfect one makes a node look a third faster, a poor one slower.
        return 0.5 + view.reputation

    def _draw(self, indexes: list[int], cost: dict[int, float], views: Sequence[NodeView], rng: random.Random) -> int:
        d = self.settings.choices
        if d and len(indexes) > d:
            indexes = rng.choices(indexes, weights=[self._weight(views[i]) for i in indexes], k=d)
        best = min(cost[i] for i in indexes)
        near = [i for i in indexes if cost[i] <= self.settings.sample_slack * best]
        return rng.choices(near, weights=[self._weight(views[i]) for i in near])[0]

    def choose(self, views: Sequence[NodeView], prompt_tokens: int, rng: random.Random, max_tokens: int = 0) -> int:
        s = self.settings
        views = with_known_decode(views)
        eligible = [i for i, v in enumerate(views) if v.reputation >= s.reputation_floor]
        if not eligible:
            raise NoEligibleNode("every candidate is below the reputation floor")
        price = marginal_cost if s.externality else estimate
        cost = {i: price(views[i], prompt_tokens, max_tokens) / self._weight(views[i]) for i in eligible}
        load = {i: _load(views[i], prompt_tokens, max_tokens, s.externality) for i in eligible}
        keep = max(1, math.ceil(len(eligible) * (1.0 - s.exclude_fraction)))
        rest = sorted(eligible, key=lambda i: (load[i], rng.random()))[:keep]
        best_match = max(views[i].matched_tokens for i in rest)
        least = min(cost[i] for i in rest)
        if best_match > 0:
            affine = [i for i in rest if views[i].matched_tokens == best_match]
            pick = self._draw(affine, cost, views, rng)
            if cost[pick] <= s.affinity_slack * least:
                return pick
        return self._draw(rest, cost, views, rng)


#: The pluggable policies by name (``ClientConfig.policy``, ``bench/forwarding.py``).
POLICIES = ("round_robin", "least_load", "prefix_only", "planetserve")


def make_policy(name: str) -> Policy:
    """A fresh policy by name (each has its own state, e.g. round robin's position)."""
    if name == "round_robin":
        return RoundRobin()
    if name == "least_load":
        return LeastLoad()
    if name == "prefix_only":
        return PrefixOnly()
    if name == "planetserve":
        return PlanetServePolicy()
    raise ValueError(f"unknown policy {name!r}; expected one of {', '.join(POLICIES)}")


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadReport:
    """The load figures of a node's last verified heartbeat (``Heartbeat`` v2 fields; the simulation builds the same
    from its simulated engine)."""

    issued_at: float
    """When the node issued it, seconds (unix time; the simulation's clock there)."""
    queued_tokens: int = 0
    """Prompt tokens still to prefill there."""
    requests: int = 0
    """Requests queued or running there."""
    decode_backlog_tokens: int = 0
    """Tokens they still have to generate (0 in a version-1 heartbeat: unknown)."""
    seconds_per_decode_token: float = 0.0
    """The node's own measured time per generated token, seconds (0: unknown): its decode step's time divided by the
    step's batch, averaged over its last steps."""
    batch: int = 0
    """Requests admitted there (prefilling or decoding; the heartbeat's ``running_requests``): about the batch that
    time was measured at (0: none running, or not known)."""
    seconds_per_prefill_token: float = 0.0
    """The node's own measured prefill time per prompt token, seconds (0: unknown, e.g. an older heartbeat): its
    prefill forwards' time over the tokens they computed, averaged over recent steps."""


@dataclass(slots=True, eq=False, kw_only=True)
class Dispatch:
    """One request this client sent to a node, as its tracker remembers it until it ends."""

    key: int
    """Its number in this tracker."""
    node_id: str
    at: float
    """When it was sent, on the clock of the reports' ``issued_at``."""
    prefill_tokens: int
    """Its uncached prompt tokens as the client estimated them."""
    max_tokens: int
    work_tokens: int
    """Prompt tokens ahead of its first token by the view it was chosen on (the TTFT sample's denominator)."""
    expected_decode_s: float
    """Per generated token, by the node's report before the client's correction (0: no report)."""
    expected_ttft_s: float = 0.0
    """Its time to first token as the node's reported prefill speed predicted it, before the client's correction
    (``reported_prefill_s x work_tokens``; 0: no report)."""


@dataclass(slots=True, kw_only=True)
class StepFit(LineFit):
    """A node's decode step time as a line in its batch, ``step = c + d x batch``, fitted (exponentially weighted
    least squares) to what its signed heartbeats report: each gives the time per sequence of its last steps and the
    requests admitted, so their product is a step's time at about that batch.

    The node reports its time **per sequence** (a step's time over its batch). Where part of a step costs the same
    whatever the batch (weights read once per step, kernel launches: 2.0 ms of the torch engine's 2.57 ms step at a
    batch of one on this machine), that figure *falls* as the batch grows, so taken as a constant per-token cost it
    made a node decoding 2-3 requests look cheaper than one decoding a single request (``docs/forwarding.md``);
    the fit's share ``d / (c + d)`` lets the estimate bring every report to the same batch."""

    alpha: float = 0.02
    """Weight of each new report once ``1 / alpha`` reports were seen (before that, their plain mean)."""
    min_points: int = 20
    """Reports before the fit is used."""
    min_variance: float = 0.25
    """Variance of the reported batch (requests squared) below which the slope is not identified."""

    def share(self) -> float | None:
        """``d / (c + d)`` in [0, 1], the part of a one-sequence step that each further sequence adds again; None
        until enough reports over different batches were seen (a point per report: ``add(batch, step_s)``)."""
        slope = self.slope()
        if slope is None:
            return None
        fixed = max(0.0, self.mean_y - slope * self.mean_x)
        if slope + fixed <= 0.0:
            return None
        return slope / (slope + fixed)


#: The batch share assumed until a fit is identified: a step's cost proportional to its batch (processor sharing,
#: what the estimate assumed before the fit existed).
PRIOR_BATCH_SHARE = 1.0

#: Weight of a node's newest report in its averaged decode speed at a batch of one (after ``1 / UNIT_ALPHA`` reports;
#: before that, their plain mean).
UNIT_ALPHA = 0.1

#: Bounds of one decode-correction sample: a single reply can move the estimate at most this far.
_CORRECTION_RANGE = (0.1, 100.0)
#: Bounds of one prefill-ratio sample (measured TTFT over the report's prediction): wider, since every node's ratio
#: also carries the path's latency, which no report includes, so the decode bound clipped a node hiding its queue
#: to near an honest node's ratio (the under-reporting process test sent it more than 4 of 12 in 2 of 5 runs with
#: the 100x bound, at most 2 of 12 in 3 of 3 with this one).
_PREFILL_RATIO_RANGE = (0.1, 10_000.0)

#: A node's own TTFT excess over the shared correction counts only beyond this factor (then as ``excess / slack``):
#: an honest node's excess is noise around 1, which, counted, misrouted more than the reports' errors it corrected;
#: a node hiding its queue answers several times later than predicted. Measured 1.2, 1.5 and 2.0 within the seeds'
#: spread of each other (``docs/forwarding.md``).
PREFILL_EXCESS_SLACK = 1.5


@dataclass(slots=True)
class _NodeStats:
    seconds_per_token: float
    samples: int = 0
    sampled_at: float = 0.0
    correction: float = 1.0
    corrections: int = 0
    decode_s_per_token: float = 0.0
    decodes: int = 0
    inflight: dict[int, Dispatch] = field(default_factory=dict)
    fit: StepFit = field(default_factory=StepFit)
    report_at: float = -math.inf
    unit_decode_s: float = 0.0
    unit_reports: int = 0
    prefill_ratio: float = 1.0
    prefill_ratios: int = 0
    reported_prefill_s: float = 0.0


class LoadTracker:
    """What a client measures of each node, and its requests in flight there.

    - An EWMA of TTFT per prompt token ahead: after each request's first token, ``ttft / (queued_tokens_at_dispatch
      + uncached_tokens)``. For an honest node about its real time per token; for a node that reported less than its
      real queue, larger by the hidden part, so its estimates grow to what it really costs (used where the node
      reports no prefill speed).
    - A **prefill correction** of the node's reported prefill speed (heartbeat v3): after each first token, the
      measured TTFT over the one the report predicted at dispatch; shared (the lower median over the nodes), times a
      node's own excess beyond :data:`PREFILL_EXCESS_SLACK` (:meth:`prefill_correction`).
    - A **correction** of the node's reported decode speed: after each reply, the measured time per generated token
      over the one its report predicted at dispatch (the report's per-token time times ``1 + overlap / max_tokens``).
      The prediction is made from a fresh report, so for an honest node the ratio stays near 1 however its load
      moves (a correction does not lag by a reply, as an absolute measured decode speed would); a node that
      under-reports its backlog or its speed answers slower than predicted, and its correction grows.
    - The requests it sent and that have not ended (bounded by the client's own concurrency): those sent after a
      report was issued are added to it, since the report cannot show them.
    """

    def __init__(self, *, prior_seconds_per_token: float = 1e-3, alpha: float = 0.2, half_life_s: float = 10.0) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError("alpha must be in (0, 1]")
        if half_life_s <= 0.0:
            raise ValueError("half_life_s must be positive")
        self.prior = prior_seconds_per_token
        self.alpha = alpha
        self.half_life_s = half_life_s
        self.unit_alpha = UNIT_ALPHA
        self._nodes: dict[str, _NodeStats] = {}
        self._ids = 0
        self._fit = StepFit()
        self._shared_prefill: float | None = None

    def _stats(self, node_id: str) -> _NodeStats:
        stats = self._nodes.get(node_id)
        if stats is None:
            stats = self._nodes[node_id] = _NodeStats(seconds_per_token=self.prior)
        return stats

    def _aged(self, value: float, baseline: float, stats: _NodeStats, now: float | None) -> float:
        """``value`` drawn back towards ``baseline`` with the age of the node's last measurement (half-life
        ``half_life_s``): a node the client stopped choosing after a few slow answers is not judged by them forever,
        so it gets chosen, and measured, again; a node that really is slow is measured slow again each time."""
        if now is None:
            return value
        weight = math.pow(0.5, max(0.0, now - stats.sampled_at) / self.half_life_s)
        return baseline + (value - baseline) * weight

    def seconds_per_token(self, node_id: str, *, now: float | None = None) -> float:
        """The TTFT-per-token estimate (aged at ``now``, on the clock of the dispatch times). A node not measured
        yet gets the mean of the measured ones (else the prior): an optimistic guess would send every next request
        to whichever node is still unknown."""
        stats = self._stats(node_id)
        measured = [s.seconds_per_token for s in self._nodes.values() if s.samples]
        mean = sum(measured) / len(measured) if measured else self.prior
        return self._aged(stats.seconds_per_token, mean, stats, now) if stats.samples else mean

    def correction(self, node_id: str, *, now: float | None = None) -> float:
        """Measured over reported decode time per token, aged at ``now`` towards the mean of the measured nodes'.

        A node not measured yet gets that mean (1 when none is): part of every correction is this client's own
        (reply batching and path latency make each reply slower per token than any engine reports), and leaving an
        unmeasured node at 1 made it look cheaper than the node that had just answered, whose prefix it lacks."""
        stats = self._stats(node_id)
        measured = [s.correction for s in self._nodes.values() if s.corrections]
        mean = sum(measured) / len(measured) if measured else 1.0
        return self._aged(stats.correction, mean, stats, now) if stats.corrections else mean

    def shared_prefill_correction(self) -> float:
        """The lower median over the measured nodes of their prefill correction (1 when none is measured): the part
        every node shares (the queue's interleaved decode steps, the path's latency, what ``STEP_TOKENS`` stands
        for), learned from any node's answers; a median, so a node that lies does not raise every other node's
        price, and the lower one, so that with two nodes it is not their mean (a liar answering ten times late beside
        an honest node then raised the shared figure 5.5 times and its own price only 1.2 times more)."""
        if self._shared_prefill is None:
            ratios = sorted(s.prefill_ratio for s in self._nodes.values() if s.prefill_ratios)
            self._shared_prefill = ratios[(len(ratios) - 1) // 2] if ratios else 1.0
        return self._shared_prefill

    def _unknown_prefill_s(self, node_id: str, *, now: float | None) -> float:
        """The prefill estimate of a node that reports no prefill speed (it has computed nothing since it started, or
        its heartbeat is older than version 3) and that this client has not measured: the mean of the other nodes'
        reports times the correction, when any reports one; else :meth:`seconds_per_token` (the measured nodes' mean,
        or the prior). The prior (1 ms a token) beside nodes priced from their reports (0.04 ms on the quick model)
        would make an idle node look 25 times dearer per token than a busy one, as leaving it cheap would send
        every request to whichever node is still unknown."""
        reported = [s.reported_prefill_s for s in self._nodes.values() if s.reported_prefill_s > 0.0]
        if not reported:
            return self.seconds_per_token(node_id, now=now)
        return sum(reported) / len(reported) * self.prefill_correction(node_id, now=now)

    def prefill_correction(self, node_id: str, *, now: float | None = None) -> float:
        """What the node's reported prefill speed is multiplied by: the shared correction
        (:meth:`shared_prefill_correction`), times the node's own excess over it (its EWMA of measured TTFT over the
        reports' predictions, aged at ``now`` towards the shared figure) where that is more than
        :data:`PREFILL_EXCESS_SLACK`: a node that hides its queue or its speed is caught by its own slow first
        tokens, and an honest node's noise around the shared figure is not counted.

        Measured (``docs/forwarding.md``): each node's own correction in place of the shared one, as for decode, was
        noisier than the reports it corrected, and made every long-prompt run slower."""
        stats = self._stats(node_id)
        shared = self.shared_prefill_correction()
        if not stats.prefill_ratios:
            return shared
        excess = self._aged(stats.prefill_ratio, shared, stats, now) / shared
        return shared * max(1.0, excess / PREFILL_EXCESS_SLACK)

    def measured_decode_s(self, node_id: str, *, now: float | None = None) -> float:
        """The client's own EWMA of the node's time per generated token, seconds (0 until measured): what the
        estimate uses for a node whose heartbeat reports no decode speed."""
        stats = self._stats(node_id)
        measured = [s.decode_s_per_token for s in self._nodes.values() if s.decodes]
        if not stats.decodes:
            return 0.0
        return self._aged(stats.decode_s_per_token, sum(measured) / len(measured), stats, now)

    def batch_share(self, node_id: str) -> float:
        """The node's fitted :meth:`StepFit.share`; for a node not identified yet, the mean of those that are (one
        engine's physics is much like another's), else the fit over every node's reports together (identified
        sooner, but mixing nodes of different speeds), else :data:`PRIOR_BATCH_SHARE`."""
        own = self._stats(node_id).fit.share()
        if own is not None:
            return own
        fitted = [f for f in (s.fit.share() for s in self._nodes.values()) if f is not None]
        if fitted:
            return sum(fitted) / len(fitted)
        pooled = self._fit.share()
        return PRIOR_BATCH_SHARE if pooled is None else pooled

    def inflight(self, node_id: str) -> int:
        """This client's requests sent to the node and not yet ended."""
        return len(self._stats(node_id).inflight)

    def view(
        self,
        node_id: str,
        *,
        report: LoadReport | None,
        matched_tokens: int = 0,
        reputation: float = NEUTRAL_REPUTATION,
        now: float | None = None,
    ) -> NodeView:
        """The node as the policy sees it: its report plus this client's own requests sent since it was issued
        (all of them when there is no report), with the client's measurements (aged at ``now``, the clock of the
        reports and dispatches; None: not aged)."""
        stats = self._stats(node_id)
        since = report.issued_at if report is not None else -math.inf
        own = [d for d in stats.inflight.values() if d.at >= since]
        reported_decode = report.seconds_per_decode_token if report is not None else 0.0
        share = self.batch_share(node_id)
        if report is not None and report.issued_at > stats.report_at and reported_decode > 0.0:
            stats.report_at = report.issued_at
            if report.batch > 0:
                stats.fit.add(report.batch, reported_decode * report.batch)
                self._fit.add(report.batch, reported_decode * report.batch)
            # The report is a step's time over its batch; brought to a batch of one on the fitted line, and averaged
            # over the node's reports (its speed at a batch of one is a property of its hardware and model; what
            # moves between reports is the batch they were measured at, which the fit has taken out).
            batch = max(1, report.batch)
            unit = reported_decode * batch / (1.0 - share + share * batch)
            stats.unit_reports += 1
            stats.unit_decode_s += max(self.unit_alpha, 1.0 / stats.unit_reports) * (unit - stats.unit_decode_s)
        if reported_decode > 0.0:
            reported_decode = stats.unit_decode_s
        decode_s = (
            reported_decode * self.correction(node_id, now=now)
            if reported_decode > 0.0
            else self.measured_decode_s(node_id, now=now)
        )
        # Prefill speed: the node's fresh report times the client's correction when it reports one (a slow node is
        # known to be slow before anything is sent there); else the client's own TTFT-per-token EWMA, which learns a
        # node's speed only by sending there.
        reported_prefill = report.seconds_per_prefill_token if report is not None else 0.0
        if reported_prefill > 0.0:
            stats.reported_prefill_s = reported_prefill
            prefill_s = reported_prefill * self.prefill_correction(node_id, now=now)
        elif stats.samples:
            prefill_s = self.seconds_per_token(node_id, now=now)
        else:
            prefill_s = self._unknown_prefill_s(node_id, now=now)
        return NodeView(
            node_id=node_id,
            reputation=reputation,
            queued_tokens=(report.queued_tokens if report else 0) + sum(d.prefill_tokens for d in own),
            matched_tokens=matched_tokens,
            seconds_per_token=prefill_s,
            running_requests=(report.requests if report else 0) + len(own),
            decode_backlog_tokens=(report.decode_backlog_tokens if report else 0) + sum(d.max_tokens for d in own),
            seconds_per_decode_token=decode_s,
            reported_decode_s=reported_decode,
            reported_prefill_s=reported_prefill,
            batch_share=share,
        )

    def dispatched(self, view: NodeView, *, prompt_tokens: int, max_tokens: int, at: float) -> Dispatch:
        """A request was sent to ``view``'s node at ``at``; returns its record for :meth:`first_token` and
        :meth:`finished`."""
        stats = self._stats(view.node_id)
        uncached = max(0, prompt_tokens - view.matched_tokens)
        expected = 0.0
        if max_tokens > 0 and view.reported_decode_s > 0.0:
            expected = view.reported_decode_s * (1.0 + view.batch_share * _overlap(view, max_tokens) / max_tokens)
        self._ids += 1
        work = view.queued_tokens + uncached + STEP_TOKENS
        record = Dispatch(
            key=self._ids,
            node_id=view.node_id,
            at=at,
            prefill_tokens=uncached,
            max_tokens=max_tokens,
            work_tokens=work,
            expected_decode_s=expected,
            expected_ttft_s=view.reported_prefill_s * work,
        )
        stats.inflight[self._ids] = record
        return record

    def _ewma(self, current: float, sample: float, samples: int) -> float:
        """``current`` moved ``alpha`` of the way to ``sample``; the first sample (``samples`` == 0) replaces it."""
        return sample if samples == 0 else current + self.alpha * (sample - current)

    def first_token(self, record: Dispatch, *, ttft_s: float) -> None:
        """The request's first token arrived ``ttft_s`` after it was sent."""
        stats = self._stats(record.node_id)
        sample = ttft_s / record.work_tokens
        stats.sampled_at = max(stats.sampled_at, record.at)
        stats.seconds_per_token = self._ewma(stats.seconds_per_token, sample, stats.samples)
        stats.samples += 1
        if record.expected_ttft_s > 0.0:
            low, high = _PREFILL_RATIO_RANGE
            ratio = min(high, max(low, ttft_s / record.expected_ttft_s))
            stats.prefill_ratio = self._ewma(stats.prefill_ratio, ratio, stats.prefill_ratios)
            stats.prefill_ratios += 1
            self._shared_prefill = None

    def finished(self, record: Dispatch, *, decode_s: float = 0.0, tokens: int = 0) -> None:
        """The request ended (answered or failed); with ``tokens`` >= 2 generated, the ``decode_s`` from its first
        token to its last are measured."""
        stats = self._stats(record.node_id)
        stats.inflight.pop(record.key, None)
        if tokens < 2 or decode_s <= 0.0:
            return
        per_token = decode_s / (tokens - 1)
        stats.sampled_at = max(stats.sampled_at, record.at)
        stats.decode_s_per_token = self._ewma(stats.decode_s_per_token, per_token, stats.decodes)
        stats.decodes += 1
        if record.expected_decode_s > 0.0:
            low, high = _CORRECTION_RANGE
            sample = min(high, max(low, per_token / record.expected_decode_s))
            stats.correction = self._ewma(stats.correction, sample, stats.corrections)
            stats.corrections += 1
