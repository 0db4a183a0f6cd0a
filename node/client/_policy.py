"""Forwarding policies: which model node gets a request (``docs/forwarding.md``).

A policy sees one :class:`NodeView` per candidate (what the client knows of it: reputation, load reported in its
last signed heartbeat plus the client's own requests in flight there, the prompt's prefix affinity, and the
node's speed **as this client measured it**) and returns the index of its choice. Policies are pure and
synchronous; the client and the forwarding benchmark's simulation call the same code.

``planetserve`` (ours):

1. drop nodes below the reputation floor;
2. estimate each node's time to serve the request: ``seconds_per_token x (queued_tokens + prompt_tokens -
   matched_tokens)``, divided by a reputation weight; ``seconds_per_token`` is the client's own EWMA, so a node that
   under-reports its queue is caught by its own slow answers;
3. exclude the most loaded fraction;
4. among the rest, prefer the nodes holding the longest prefix of the prompt, unless even the best of them would
   take ``affinity_slack`` times longer than the least-loaded node (then fall back to least load);
5. take the cheapest candidate (or, with ``choices`` = d > 0, the cheaper of d sampled by reputation: power of d
   choices); each client adds its own requests in flight to what heartbeats report, which is what keeps
   independent clients on stale heartbeats from herding (measured in ``bench/forwarding.py``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

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
    """Tokens of work ahead of this request: as the node last reported, plus this client's own unreported ones."""
    matched_tokens: int = 0
    """Leading prompt tokens the node's cache summary holds (a multiple of the chunk size)."""
    seconds_per_token: float = 1e-3
    """The client's EWMA of the node's time per queued token, seconds (its prior until measured)."""


class Policy(Protocol):
    """Chooses a model node for one request."""

    name: str

    def choose(self, views: Sequence[NodeView], prompt_tokens: int, rng: random.Random) -> int:
        """Index into ``views`` (non-empty) of the chosen node."""
        ...


class RoundRobin:
    """Each next request to the next node, whatever its state (the paper's baseline)."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, views: Sequence[NodeView], prompt_tokens: int, rng: random.Random) -> int:
        index = self._next % len(views)
        self._next += 1
        return index


def _estimate(view: NodeView, prompt_tokens: int) -> float:
    uncached = max(0, prompt_tokens - view.matched_tokens)
    return view.seconds_per_token * (view.queued_tokens + uncached)


class LeastLoad:
    """The node with the least estimated work (power of two choices when ``choices`` is 2)."""

    name = "least_load"

    def __init__(self, choices: int = 0) -> None:
        self.choices = choices

    def choose(self, views: Sequence[NodeView], prompt_tokens: int, rng: random.Random) -> int:
        candidates = list(range(len(views)))
        if self.choices and len(candidates) > self.choices:
            candidates = rng.sample(candidates, self.choices)
        return min(candidates, key=lambda i: (views[i].seconds_per_token * views[i].queued_tokens, rng.random()))


class PrefixOnly:
    """The node holding the longest prefix of the prompt, ignoring load (ties at random)."""

    name = "prefix_only"

    def choose(self, views: Sequence[NodeView], prompt_tokens: int, rng: random.Random) -> int:
        best = max(v.matched_tokens for v in views)
        return rng.choice([i for i, v in enumerate(views) if v.matched_tokens == best])


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanetServeSettings:
    """The tunables of :class:`PlanetServePolicy`."""

    reputation_floor: float = 0.2
    """Nodes below this reputation are never chosen."""
    exclude_fraction: float = 0.25
    """The most loaded fraction of candidates is excluded (at least one node always remains)."""
    affinity_slack: float = 1.2
    """Affinity is preferred unless its best node's estimate exceeds the least-loaded node's by this factor."""
    choices: int = 0
    """Nodes sampled per decision (power of d choices); 0 takes the best of the candidates. The default is 0
    because the candidates are themselves a sample at scale (the client weighs a bounded random subset plus the
    nodes holding its prefix), and measured with 8 independent clients on stale heartbeats, taking the best of 8 did
    not herd (``bench/forwarding.py``: 0.65x round robin's mean vs 0.75x with two choices)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.reputation_floor <= 1.0:
            raise ValueError("reputation_floor must be in [0, 1]")
        if not 0.0 <= self.exclude_fraction < 1.0:
            raise ValueError("exclude_fraction must be in [0, 1)")
        if self.affinity_slack < 1.0:
            raise ValueError("affinity_slack must be at least 1")
        if self.choices < 0:
            raise ValueError("choices must be >= 0")


class NoEligibleNode(ValueError):
    """Every candidate is below the reputation floor."""


class PlanetServePolicy:
    """Reputation floor, load estimate from the client's own measurements, prefix affinity, power of two choices."""

    name = "planetserve"

    def __init__(self, settings: PlanetServeSettings | None = None) -> None:
        self.settings = settings or PlanetServeSettings()

    @staticmethod
    def _weight(view: NodeView) -> float:
        # Neutral reputation weighs 1; a perfect one makes a node look a third faster, a poor one slower.
        return 0.5 + view.reputation

    def _sample(self, indexes: list[int], cost: dict[int, float], views: Sequence[NodeView], rng: random.Random) -> int:
        d = self.settings.choices
        if d == 0 or len(indexes) <= d:
            picked = indexes
        else:
            weights = [self._weight(views[i]) for i in indexes]
            picked = []
            pool, pool_w = list(indexes), list(weights)
            for _ in range(d):
                choice = rng.choices(range(len(pool)), weights=pool_w)[0]
                picked.append(pool.pop(choice))
                pool_w.pop(choice)
        return min(picked, key=lambda i: (cost[i], rng.random()))

    def choose(self, views: Sequence[NodeView], prompt_tokens: int, rng: random.Random) -> int:
        s = self.settings
        eligible = [i for i, v in enumerate(views) if v.reputation >= s.reputation_floor]
        if not eligible:
            raise NoEligibleNode("every candidate is below the reputation floor")
        cost = {i: _estimate(views[i], prompt_tokens) / self._weight(views[i]) for i in eligible}
        load = {i: views[i].seconds_per_token * views[i].queued_tokens for i in eligible}
        keep = max(1, math.ceil(len(eligible) * (1.0 - s.exclude_fraction)))
        rest = sorted(eligible, key=lambda i: (load[i], rng.random()))[:keep]
        best_match = max(views[i].matched_tokens for i in rest)
        least = min(cost[i] for i in rest)
        if best_match > 0:
            affine = [i for i in rest if views[i].matched_tokens == best_match]
            pick = self._sample(affine, cost, views, rng)
            if cost[pick] <= s.affinity_slack * least:
                return pick
        return self._sample(rest, cost, views, rng)


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


@dataclass(slots=True)
class _NodeStats:
    seconds_per_token: float
    samples: int = 0
    inflight_tokens: int = 0


class LoadTracker:
    """What a client measures of each node: an EWMA of its time per queued token, and its own requests in flight.

    After each request's first token the client records ``ttft / (queued_tokens_at_dispatch + uncached_tokens)``:
    for an honest node about its real time per token; for a node that reported less than its real queue, larger by
    the hidden part, so its estimates grow to what it really costs.
    """

    def __init__(self, *, prior_seconds_per_token: float = 1e-3, alpha: float = 0.2) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError("alpha must be in (0, 1]")
        self.prior = prior_seconds_per_token
        self.alpha = alpha
        self._nodes: dict[str, _NodeStats] = {}

    def _stats(self, node_id: str) -> _NodeStats:
        stats = self._nodes.get(node_id)
        if stats is None:
            stats = self._nodes[node_id] = _NodeStats(seconds_per_token=self.prior)
        return stats

    def seconds_per_token(self, node_id: str) -> float:
        """The current estimate. A node not measured yet gets the mean of the measured ones (else the prior): an
        optimistic guess would send every next request to whichever node is still unknown."""
        stats = self._stats(node_id)
        if stats.samples:
            return stats.seconds_per_token
        measured = [s.seconds_per_token for s in self._nodes.values() if s.samples]
        return sum(measured) / len(measured) if measured else self.prior

    def inflight_tokens(self, node_id: str) -> int:
        """Tokens of this client's own requests sent to the node and not yet answered."""
        return self._stats(node_id).inflight_tokens

    def dispatched(self, node_id: str, tokens: int) -> None:
        """A request of ``tokens`` work tokens was sent to the node."""
        self._stats(node_id).inflight_tokens += tokens

    def first_token(self, node_id: str, *, ttft_s: float, work_tokens: int) -> None:
        """The first token arrived after ``ttft_s``; ``work_tokens`` were ahead of it by the node's own account."""
        stats = self._stats(node_id)
        sample = ttft_s / max(1, work_tokens)
        if stats.samples == 0:
            stats.seconds_per_token = sample
        else:
            stats.seconds_per_token += self.alpha * (sample - stats.seconds_per_token)
        stats.samples += 1

    def finished(self, node_id: str, tokens: int) -> None:
        """The request dispatched with ``tokens`` ended (answered or failed)."""
        stats = self._stats(node_id)
        stats.inflight_tokens = max(0, stats.inflight_tokens - tokens)
