"""Forwarding benchmark: the paper's experiment shape, as a discrete-event simulation calibrated on the torch engine.

Run ``python bench/forwarding.py`` (``--quick`` for a short run). Prints tables and writes
``bench/results/forwarding.json``.

Shape (PlanetServe/GenTorrent §6): prompts share prefixes drawn Zipf(1.1) from a set of documents, arrivals are
Poisson, 8 model nodes. Every policy in ``node.client._policy`` (the same code the ``Client`` runs) routes the same
arrival sequence, side by side, at 60/75/90/100% of round robin's measured capacity, for two workloads:

- ``short``: short shared system prompts (32-256 tokens) and slow decode (64-256 output tokens);
- ``long``: long shared documents (2-6k tokens) with short questions and answers.

The model node in the simulation is the torch engine's scheduler as measured here (the calibration is printed): each
iteration prefills at most one waiting prompt (its uncached tokens) and then runs one decode step over the running
batch; a 16-token-block prefix cache with LRU eviction per node; the node's heartbeat reports queued tokens and a
cache summary of blocks seen in at least K=3 distinct requests, published every ``heartbeat_s`` (so clients act on
stale state, plus what they know of their own requests in flight).

Also: heterogeneous nodes (2 of 8 three times slower, one of them reporting zero load) with two oracles that bound
what routing can do (exact state: greedy, and the best static split between the classes) and a **sensitivity** run
on an assumed batch-flat decode step (labelled as such: an assumption, not a measurement), 8 independent clients
whose heartbeats are 0.25 s and 1 s old, and a scale run of 1,000 nodes and 100 clients (heartbeat bytes per client
per second). Every table runs ``--seeds`` seeds side by side (5 by default) and reports medians and the spread of
each ratio; ``oracle`` (:class:`ExactOracle`) reads the simulated nodes' exact state, a reference and not a client.
The 8-node simulation is checked against a real multi-process run with ``--real`` (``bench/forwarding_real.py``).
Performance figures come from this script's own output: nothing here is asserted.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import platform
import random
import statistics
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from node.client._policy import POLICIES, Dispatch, LoadReport, LoadTracker, Policy, make_policy
from node.inference._prefill_fit import PrefillFit

RESULTS = Path(__file__).resolve().parent / "results" / "forwarding.json"
MODELS = Path(__file__).resolve().parents[1] / "build" / "models"
BLOCK = 16


@dataclass(frozen=True, slots=True)
class Calibration:
    """Costs of the torch engine on this machine, seconds (``prefill = a + b * tokens``; ``step = c + d * batch``)."""

    prefill_fixed_s: float
    prefill_per_token_s: float
    decode_fixed_s: float
    decode_per_seq_s: float
    source: str


def measure_calibration() -> Calibration:
    """Time the quick model's prefill chunk at two lengths and its decode step at two batch sizes, on the engine
    configured as ``ps-node serve`` runs it."""
    import asyncio

    from node.inference import EngineConfig, GenerationRequest, SamplingParams, TorchEngine, ensure_model
    from node.inference._training import QUICK

    folder = ensure_model(QUICK, MODELS)

    async def run() -> Calibration:
        engine = TorchEngine.from_folder(folder, EngineConfig(device="cpu", max_queue=64))  # as ps-node serve
        rng = random.Random(7)
        vocab = 250

        async def one(tokens: int, gen: int) -> tuple[float, float]:
            prompt = tuple(rng.randrange(4, vocab) for _ in range(tokens))  # unique: never a cache hit
            params = SamplingParams(max_tokens=gen, temperature=0.0)
            start = time.perf_counter()
            first = 0.0
            async for chunk in engine.generate(
                GenerationRequest(request_id=f"c{rng.random()}", prompt=prompt, params=params)
            ):
                if first == 0.0 and chunk.token_ids:
                    first = time.perf_counter() - start
            return first, time.perf_counter() - start

        try:
            await one(64, 2)  # warm-up
            short = statistics.median([(await one(64, 1))[0] for _ in range(5)])
            long = statistics.median([(await one(448, 1))[0] for _ in range(5)])  # one prefill chunk (<= 512)
            b = max(1e-7, (long - short) / (448 - 64))
            a = max(0.0, short - 64 * b)
            gen = 24
            solo = statistics.median([(lambda r: (r[1] - r[0]) / (gen - 1))(await one(16, gen)) for _ in range(3)])
            batch = 8
            results = await asyncio.gather(*[one(16, gen) for _ in range(batch)])
            step8 = statistics.median([(r[1] - r[0]) / (gen - 1) for r in results])
            d = max(1e-6, (step8 - solo) / (batch - 1))
            c = max(1e-6, solo - d)
            return Calibration(a, b, c, d, "measured now on the quick model (torch, CPU)")
        finally:
            await engine.close()

    return asyncio.run(run())


#: Fallback when the engine cannot run: the figures measured for the committed bench/results/forwarding.json before.
DEFAULT_CALIBRATION = Calibration(0.00431, 5.0e-05, 0.00201, 0.00057, "committed calibration (not measured now)")


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    docs: int
    doc_tokens: tuple[int, int]
    suffix_tokens: tuple[int, int]
    output_tokens: tuple[int, int]
    cache_tokens: int
    """Per-node prefix cache capacity, tokens."""


WORKLOADS = {
    "short": Workload("short", 60, (32, 256), (16, 64), (64, 256), 16_384),
    "long": Workload("long", 200, (2_000, 6_000), (32, 128), (16, 48), 65_536),
}


@dataclass(slots=True)
class Request:
    rid: int
    arrival: float
    doc: int
    doc_blocks: int
    prompt_tokens: int
    output_tokens: int
    client: int
    node: int = -1
    matched: int = 0
    first_token: float = 0.0
    done: float = 0.0
    computed: int = 0
    generated: int = 0
    admitted: bool = False
    queued_at: float = 0.0
    record: Dispatch | None = None


def make_requests(wl: Workload, rate: float, count: int, clients: int, seed: int) -> list[Request]:
    rng = random.Random(seed)
    doc_rng = random.Random(1000 + seed)
    docs = [doc_rng.randint(*wl.doc_tokens) for _ in range(wl.docs)]
    weights = [1.0 / (i + 1) ** 1.1 for i in range(wl.docs)]
    t = 0.0
    out = []
    for rid in range(count):
        t += rng.expovariate(rate)
        doc = rng.choices(range(wl.docs), weights=weights)[0]
        doc_tokens = docs[doc] - docs[doc] % BLOCK
        prompt = doc_tokens + rng.randint(*wl.suffix_tokens)
        out.append(
            Request(
                rid=rid,
                arrival=t,
                doc=doc,
                doc_blocks=doc_tokens // BLOCK,
                prompt_tokens=prompt,
                output_tokens=rng.randint(*wl.output_tokens),
                client=rng.randrange(clients),
            )
        )
    return out


#: The torch engine's scheduler knobs as ``ps-node serve`` runs it (``EngineConfig`` defaults).
MAX_RUNNING = 8
MAX_BATCH_TOKENS = 512
#: The engine's fairness bound (``_FAIRNESS_S``) and its per-decode-token EWMA weight (``_DECODE_EWMA``).
FAIRNESS_S = 1.0
DECODE_EWMA = 0.1
#: ``HeartbeatPublisher.interval_s`` and ``ClientConfig.heartbeat_refresh_s``: the real staleness.
PUBLISH_S = 0.5
REFRESH_S = 0.5


@dataclass(slots=True)
class Node:
    """One simulated model node: the torch engine's token-budget scheduler (``TorchEngine._step``: every decode,
    then short prefill chunks, then long ones, admission up to ``MAX_RUNNING`` with the longest cached prefix first
    unless a request waited over ``FAIRNESS_S``), costed with the calibration. Its cache holds whole documents'
    blocks (each request inserts its document's prefix once prefilled), so LRU over documents is the block cache's
    leaf-first LRU for prompts that share only whole documents. Its heartbeat carries exactly the engine's
    ``stats()`` figures, re-issued lazily when fetched and older than ``PUBLISH_S``."""

    index: int
    slowdown: float
    liar: bool
    cache_blocks: int
    cache: OrderedDict[int, int] = field(default_factory=OrderedDict)
    cached_blocks: int = 0
    seen: OrderedDict[int, int] = field(default_factory=OrderedDict)
    waiting: list[Request] = field(default_factory=list)
    running: list[Request] = field(default_factory=list)
    busy: bool = False
    decode_token_s: float = 0.0
    prefill_fit: PrefillFit = field(default_factory=PrefillFit)
    """The engine's fit of a step's prefill time in its tokens (``EngineStats.seconds_per_prefill_token``)."""
    report_prefill: bool = True
    summary: dict[int, int] = field(default_factory=dict)
    report: LoadReport | None = None
    step_decodes: list[Request] = field(default_factory=list)
    step_chunks: list[tuple[Request, int]] = field(default_factory=list)
    step_cost: float = 0.0

    def hit_blocks(self, req: Request) -> int:
        # The engine leaves at least one prompt token to compute (its logits start the completion).
        return min(self.cache.get(req.doc, 0), req.doc_blocks, (req.prompt_tokens - 1) // BLOCK)

    def insert(self, req: Request) -> None:
        if req.doc in self.cache:
            self.cache.move_to_end(req.doc)
            return
        self.cache[req.doc] = req.doc_blocks
        self.cached_blocks += req.doc_blocks
        while self.cached_blocks > self.cache_blocks and len(self.cache) > 1:
            _, blocks = self.cache.popitem(last=False)
            self.cached_blocks -= blocks

    def observe(self, req: Request) -> None:
        """The heartbeat's K-distinct counter (``CacheSummaryBuilder.observe``), at request start."""
        self.seen[req.doc] = self.seen.get(req.doc, 0) + 1
        self.seen.move_to_end(req.doc)
        while len(self.seen) > 4096:
            self.seen.popitem(last=False)

    def heartbeat(self, now: float, k_distinct: int, publish_s: float) -> LoadReport:
        """What ``GET /overlay/v1/heartbeat`` would serve now (re-issued when older than ``publish_s``)."""
        if self.report is None or now - self.report.issued_at >= publish_s:
            self.summary = {d: blocks for d, blocks in self.cache.items() if self.seen.get(d, 0) >= k_distinct}
            prefilling = sum(r.prompt_tokens - r.computed for r in self.running if r.computed < r.prompt_tokens)
            queued = sum(r.prompt_tokens for r in self.waiting) + prefilling
            backlog = sum(r.output_tokens - r.generated for r in (*self.waiting, *self.running))
            requests = len(self.waiting) + len(self.running)
            batch = len(self.running)
            if self.liar:  # reports zero load (its speed as measured, so only its load is a lie)
                queued = backlog = requests = batch = 0
            self.report = LoadReport(
                issued_at=now,
                queued_tokens=queued,
                requests=requests,
                decode_backlog_tokens=backlog,
                seconds_per_decode_token=self.decode_token_s,
                batch=batch,
                seconds_per_prefill_token=self.prefill_fit.slope() if self.report_prefill else 0.0,
            )
        return self.report

    def plan_step(self, now: float, cal: Calibration) -> bool:
        """Choose the next step's decodes and prefill chunks (``TorchEngine._step``); False when idle."""
        decodes = [r for r in self.running if r.computed >= r.prompt_tokens]
        prefilling = [r for r in self.running if r.computed < r.prompt_tokens]
        budget = MAX_BATCH_TOKENS - len(decodes)
        short = MAX_BATCH_TOKENS // 4
        scored = []
        for pos, r in enumerate(self.waiting):
            hit = self.hit_blocks(r)
            starving = now - r.queued_at > FAIRNESS_S
            scored.append((0 if starving else 1, 0 if starving else -hit, pos, r, r.prompt_tokens - hit * BLOCK))
        scored.sort(key=lambda row: row[:3])
        pending = [(r, r.prompt_tokens - r.computed) for r in prefilling] + [(row[3], row[4]) for row in scored]
        long_pending = any(left > short for _, left in pending)
        short_budget = budget // 2 if long_pending else budget
        spent = 0
        blocked = False
        chunks: list[tuple[Request, int]] = []
        for phase in ("short", "long"):
            cap = short_budget if phase == "short" else budget
            for r, left in pending:
                if (left <= short) != (phase == "short") or spent >= cap:
                    continue
                if not r.admitted:
                    if blocked or len(self.running) >= MAX_RUNNING:
                        blocked = True
                        continue
                    self.waiting.remove(r)
                    r.admitted = True
                    r.matched = r.computed = self.hit_blocks(r) * BLOCK
                    self.running.append(r)
                    left = r.prompt_tokens - r.computed
                n = min(left, cap - spent)
                chunks.append((r, n))
                spent += n
        if not decodes and not chunks:
            return False
        cost = cal.decode_fixed_s + cal.decode_per_seq_s * len(decodes) if decodes else 0.0
        cost += sum(cal.prefill_fixed_s + cal.prefill_per_token_s * n for _, n in chunks)
        self.step_decodes, self.step_chunks, self.step_cost = decodes, chunks, cost * self.slowdown
        return True


class ExactOracle:
    """A reference, not a policy a client could run: it reads every simulated node's **exact** state at the instant
    of the request (no heartbeat, no staleness, the true output lengths and cache contents) and prices it with the
    calibration's **true** costs, choosing the least marginal cost: the request's own time there plus the delay it
    adds to the requests already decoding there. What a greedy router with perfect information does; not a bound
    on every possible routing (it is greedy), but the mark the policies' information loss is measured against.

    ``slow_share`` > 0 makes it a static split (``hetero`` oracle): each request goes to the slow class with that
    probability (a seeded draw), and to the exact-state best node of its class."""

    name = "oracle"

    def __init__(self, nodes: Sequence[Node], cal: Calibration, *, slow: Sequence[int] = (), slow_share: float = -1.0):
        self.nodes = nodes
        self.cal = cal
        self.slow = frozenset(slow)
        self.slow_share = slow_share

    def cost(self, node: Node, req: Request) -> float:
        cal, k = self.cal, node.slowdown
        others = [*node.running, *node.waiting]
        left = [r.output_tokens - r.generated for r in others]
        m = req.output_tokens
        overlap = sum(min(x, m) for x in left)
        uncached = req.prompt_tokens - node.hit_blocks(req) * BLOCK
        ahead = sum(r.prompt_tokens - r.computed for r in node.running if r.computed < r.prompt_tokens)
        ahead += sum(r.prompt_tokens - node.hit_blocks(r) * BLOCK for r in node.waiting)

        def prefill(tokens: int) -> float:
            return k * (math.ceil(tokens / MAX_BATCH_TOKENS) * cal.prefill_fixed_s + cal.prefill_per_token_s * tokens)

        wait = 0.0
        if len(others) >= MAX_RUNNING:  # a slot frees when the (len - MAX_RUNNING + 1)-th shortest reply ends
            step = k * (cal.decode_fixed_s + cal.decode_per_seq_s * MAX_RUNNING)
            wait = sorted(left)[len(others) - MAX_RUNNING] * step
        d = k * cal.decode_per_seq_s
        own = wait + prefill(ahead) + prefill(uncached) + m * k * (cal.decode_fixed_s + cal.decode_per_seq_s)
        own += d * overlap
        return own + d * overlap + prefill(uncached) * len(node.running)

    def choose(self, views: Sequence[Any], prompt_tokens: int, rng: random.Random, max_tokens: int = 0) -> int:
        raise NotImplementedError("the oracle reads the simulation's state: simulate() calls pick()")

    def pick(self, req: Request, candidates: Sequence[Node], rng: random.Random) -> int:
        indexes = list(range(len(candidates)))
        if self.slow_share >= 0.0:
            to_slow = rng.random() < self.slow_share
            indexes = [i for i in indexes if (candidates[i].index in self.slow) == to_slow] or indexes
        return min(indexes, key=lambda i: (self.cost(candidates[i], req), rng.random()))


#: Prefixes a client remembers having sent (``Client``'s affinity memory).
MEMORY_ENTRIES = 4096


class _Forgetful(OrderedDict[int, int]):
    """The memory of a policy that does not use one."""

    def __setitem__(self, key: int, value: int) -> None:
        pass

    def move_to_end(self, key: int, last: bool = True) -> None:
        pass


@dataclass(slots=True)
class Scenario:
    workload: Workload
    nodes: int = 8
    clients: int = 1
    refresh_s: float = REFRESH_S
    """How often a client re-fetches heartbeats (``ClientConfig.heartbeat_refresh_s``)."""
    publish_s: float = PUBLISH_S
    """How often a node re-issues its heartbeat at most (``HeartbeatPublisher.interval_s``)."""
    slow: tuple[int, ...] = ()
    liars: tuple[int, ...] = ()
    k_distinct: int = 3
    sample_candidates: int = 0
    """0: every client weighs every node; else a random sample of this many plus the nodes holding the prefix."""
    speed: float = 1.0
    """Every node's cost factor (the slow ones' 3 is on top of it)."""
    overhead_s: float = 0.0
    """Network time added to each request before it reaches the node (the real run's measured path latency)."""
    report_prefill: bool = True
    """Whether the nodes' heartbeats carry their measured prefill time per token (v3; False: as a v2 node)."""


def simulate(
    sc: Scenario,
    policy_name: str,
    requests: Sequence[Request],
    cal: Calibration,
    seed: int = 0,
    *,
    slow_share: float = -1.0,
) -> dict[str, float]:
    """Run ``requests`` through ``sc.nodes`` simulated model nodes with one policy per client; latency statistics.

    Each client builds its views with ``LoadTracker.view`` from the heartbeats it last fetched (every
    ``refresh_s``, each at most ``PUBLISH_S`` old when fetched), exactly as ``Client.choose`` does. The policy
    ``oracle`` is :class:`ExactOracle` (a reference; with ``slow_share`` >= 0 the static split between the slow
    nodes and the others)."""
    rng = random.Random(seed)
    cache_blocks = sc.workload.cache_tokens // BLOCK
    nodes = [
        Node(
            i, sc.speed * (3.0 if i in sc.slow else 1.0), i in sc.liars, cache_blocks, report_prefill=sc.report_prefill
        )
        for i in range(sc.nodes)
    ]
    oracle = ExactOracle(nodes, cal, slow=sc.slow, slow_share=slow_share) if policy_name == "oracle" else None
    policies: list[Policy] = [oracle or make_policy(policy_name) for _ in range(sc.clients)]
    trackers = [LoadTracker(prior_seconds_per_token=cal.prefill_per_token_s) for _ in range(sc.clients)]
    reqs = [replace(r) for r in requests]  # fresh per run: the simulation writes timings into them
    # Each client remembers where it sent each prefix (bounded LRU): private to it, never sent anywhere.
    memories: list[OrderedDict[int, int]] = [OrderedDict() for _ in range(sc.clients)]
    if policy_name in ("round_robin", "least_load", "oracle"):
        memories = [_Forgetful() for _ in range(sc.clients)]
    # Each client's copy of each node's heartbeat, and when it last fetched them.
    beats: list[dict[int, tuple[LoadReport, dict[int, int]]]] = [{} for _ in range(sc.clients)]
    fetched_at = [-math.inf] * sc.clients
    events: list[tuple[float, int, int, Any]] = []
    rr_next = [rng.randrange(sc.nodes) for _ in range(sc.clients)]
    seq = 0

    def push(t: float, kind: int, payload: Any) -> None:
        nonlocal seq
        heapq.heappush(events, (t, seq, kind, payload))
        seq += 1

    ARRIVE, REACH, STEP_END = 0, 1, 2
    for r in reqs:
        push(r.arrival, ARRIVE, r)
    horizon = reqs[-1].arrival if reqs else 0.0

    def start(node: Node, now: float) -> None:
        node.busy = node.plan_step(now, cal)
        if node.busy:
            push(now + node.step_cost, STEP_END, node)

    def done(r: Request, node: Node, now: float) -> None:
        r.done = now
        if r.record is not None:
            trackers[r.client].finished(r.record, decode_s=now - r.first_token, tokens=r.generated)

    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == ARRIVE:
            r = payload
            tracker = trackers[r.client]
            memory = memories[r.client]
            if policy_name == "round_robin":
                candidates = [nodes[rr_next[r.client] % len(nodes)]]
                rr_next[r.client] += 1
            elif sc.sample_candidates and sc.sample_candidates < len(nodes):
                # At scale a client weighs a random sample plus the nodes known to hold the prefix.
                # (It fetches heartbeats only from the nodes it samples; what others hold it knows from its memory.)
                chosen = {n.index: n for n in rng.sample(nodes, sc.sample_candidates)}
                remembered = memory.get(r.doc)
                if remembered is not None:
                    chosen.setdefault(remembered, nodes[remembered])
                candidates = list(chosen.values())
            else:
                candidates = nodes
            mine = beats[r.client]
            if policy_name != "round_robin" and now - fetched_at[r.client] >= sc.refresh_s:
                fetched_at[r.client] = now
                for node in candidates if sc.sample_candidates else nodes:
                    mine[node.index] = (node.heartbeat(now, sc.k_distinct, sc.publish_s), dict(node.summary))
            elif sc.sample_candidates and policy_name != "round_robin":
                for node in candidates:  # at scale: the sampled nodes' heartbeats are fetched for this request
                    if node.index not in mine or now - mine[node.index][0].issued_at >= sc.refresh_s:
                        mine[node.index] = (node.heartbeat(now, sc.k_distinct, sc.publish_s), dict(node.summary))
            views = []
            for node in candidates:
                report, summary = mine.get(node.index, (None, {}))
                matched = min(summary.get(r.doc, 0), r.doc_blocks)
                if memory.get(r.doc) == node.index:
                    matched = r.doc_blocks  # this client sent this prefix there itself (its own, private memory)
                views.append(tracker.view(str(node.index), report=report, matched_tokens=matched * BLOCK, now=now))
            if oracle is not None:
                pick = oracle.pick(r, candidates, rng)
            else:
                pick = (
                    0
                    if len(candidates) == 1
                    else policies[r.client].choose(views, r.prompt_tokens, rng, r.output_tokens)
                )
            index = candidates[pick].index
            r.node = index
            memory[r.doc] = index
            memory.move_to_end(r.doc)
            if len(memory) > MEMORY_ENTRIES:
                memory.popitem(last=False)
            r.record = tracker.dispatched(
                views[pick], prompt_tokens=r.prompt_tokens, max_tokens=r.output_tokens, at=now
            )
            push(now + sc.overhead_s, REACH, r)
        elif kind == REACH:
            r = payload
            node = nodes[r.node]
            r.queued_at = now
            node.observe(r)
            node.waiting.append(r)
            if not node.busy:
                start(node, now)
        else:
            node = payload
            for d in node.step_decodes:
                d.generated += 1
                if d.generated >= d.output_tokens:
                    node.running.remove(d)
                    done(d, node, now)
            for c, n in node.step_chunks:
                c.computed += n
                if c.computed >= c.prompt_tokens:
                    c.first_token = now
                    c.generated = 1
                    node.insert(c)
                    if c.record is not None:
                        trackers[c.client].first_token(c.record, ttft_s=now - c.arrival)
                    if c.generated >= c.output_tokens:
                        node.running.remove(c)
                        done(c, node, now)
            if node.step_decodes:
                # The engine times its batched decode forward alone, per sequence (prefill chunks are not in it).
                sample = (cal.decode_fixed_s + cal.decode_per_seq_s * len(node.step_decodes)) * node.slowdown
                sample /= len(node.step_decodes)
                prev = node.decode_token_s
                node.decode_token_s = sample if prev == 0.0 else prev + DECODE_EWMA * (sample - prev)
            if node.step_chunks:
                # The engine times its prefill forwards apart too, and fits their time as a line in their tokens.
                spent = sum(cal.prefill_fixed_s + cal.prefill_per_token_s * n for _, n in node.step_chunks)
                node.prefill_fit.add(sum(n for _, n in node.step_chunks), spent * node.slowdown)
            start(node, now)
    latencies = [r.done - r.arrival for r in reqs]
    ttfts = [r.first_token - r.arrival for r in reqs]
    hit = sum(r.matched for r in reqs) / max(1, sum(r.prompt_tokens for r in reqs))
    lat_sorted = sorted(latencies)
    classes: dict[str, float] = {}
    if sc.slow:
        # Where the traffic went: slow nodes should get only the overflow the fast ones cannot take in time.
        slow = [r for r in reqs if r.node in sc.slow]
        fast = [r for r in reqs if r.node not in sc.slow]
        classes["slow_share"] = len(slow) / len(reqs)
        classes["fast_mean_s"] = statistics.fmean(r.done - r.arrival for r in fast) if fast else 0.0
        classes["slow_mean_s"] = statistics.fmean(r.done - r.arrival for r in slow) if slow else 0.0
        for i in sc.slow:
            classes[f"share_node{i}"] = sum(1 for r in slow if r.node == i) / len(reqs)
    return {
        **classes,
        "mean_s": statistics.fmean(latencies),
        "p50_s": statistics.median(latencies),
        "p99_s": lat_sorted[min(len(lat_sorted) - 1, int(0.99 * len(lat_sorted)))],
        "ttft_mean_s": statistics.fmean(ttfts),
        "ttft_p50_s": statistics.median(ttfts),
        "cache_hit_rate": hit,
        "makespan_s": max(r.done for r in reqs) - reqs[0].arrival,
        "horizon_s": horizon,
    }


def capacity(sc: Scenario, cal: Calibration, count: int, seed: int) -> float:
    """Round robin's capacity (requests/s): its throughput with the queue never empty (all requests at time 0)."""
    reqs = make_requests(sc.workload, 1e9, count, sc.clients, seed)
    result = simulate(sc, "round_robin", reqs, cal, seed)
    return count / result["makespan_s"]


def _table(title: str, rows: list[dict[str, Any]], cols: Sequence[str]) -> None:
    print(f"\n{title}")
    widths = [max(len(c), *(len(_fmt(r.get(c, "-"))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        print("  ".join(_fmt(r.get(c, "-")).ljust(w) for c, w in zip(cols, widths, strict=True)))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def run_loads(
    sc: Scenario,
    cal: Calibration,
    loads: Sequence[float],
    count: int,
    seeds: Sequence[int],
    policies: Sequence[str],
) -> tuple[float, list[dict[str, Any]]]:
    """Every policy on the same arrivals, for each seed (other arrivals, other prompt draws) side by side; one row per
    (load, policy) with each figure's median over the seeds, and each ratio to round robin's as the median, min and
    max of the per-seed ratios (a ratio within its spread of 1 is a tie, not a win or a loss)."""
    cap = capacity(sc, cal, max(400, count // 2), seeds[0])
    rows = []
    for load in loads:
        per_seed: dict[str, list[dict[str, float]]] = {name: [] for name in policies}
        for seed in seeds:
            reqs = make_requests(sc.workload, cap * load, count, sc.clients, seed + int(load * 100))
            base: dict[str, float] | None = None
            for name in policies:
                r = simulate(sc, name, reqs, cal, seed)
                if name == "round_robin":
                    base = r
                if base is not None:
                    r["mean_vs_rr"] = r["mean_s"] / base["mean_s"]
                    r["ttft_vs_rr"] = r["ttft_mean_s"] / base["ttft_mean_s"]
                    r["p99_vs_rr"] = r["p99_s"] / base["p99_s"]
                per_seed[name].append(r)
        for name in policies:
            runs = per_seed[name]
            row: dict[str, Any] = {"workload": sc.workload.name, "load": load, "policy": name, "seeds": len(runs)}
            for key in runs[0]:
                values = [run[key] for run in runs]
                row[key] = statistics.median(values)
                if key.endswith("_vs_rr"):
                    row[f"{key}_min"], row[f"{key}_max"] = min(values), max(values)
                    row[f"{key}_by_seed"] = values
            rows.append(row)
    return cap, rows


def _spread(row: dict[str, Any], key: str) -> str:
    """``median [min, max]`` of a ratio over the seeds."""
    if key not in row:
        return "-"
    return f"{row[key]:.3f} [{row[key + '_min']:.3f}, {row[key + '_max']:.3f}]"


#: Shares of the requests sent to the slow class that the static-split oracle tries (it keeps the best).
SPLIT_GRID = (0.0, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2)


def heterogeneous(wl: Workload, cal: Calibration, count: int, seeds: Sequence[int]) -> list[dict[str, Any]]:
    """2 of 8 nodes 3x slower (node 1 also reporting zero load) on the arrivals of the all-equal run, per load: the
    policies, the references (the 6 fast nodes alone; 8 equal nodes of the same total capacity), and two oracles
    with exact state and true costs: the greedy marginal-cost choice over all 8 nodes, and the best **static split**
    (a fixed share of the requests to the slow class, searched over ``SPLIT_GRID``, each sent to the exact-state best
    node of its class). Every figure is the median over the seeds; the ratios (``vs_all_equal``: to planetserve on 8
    equal nodes, the issue's baseline; ``vs_split_oracle``: the routing loss; ``vs_all_equal_oracle``: to the
    greedy oracle on 8 equal nodes, so that the oracle's own row is what the slow nodes cost with routing taken out)
    also carry their min and max."""
    slow, liar = (0, 1), (1,)
    rows: list[dict[str, Any]] = []
    for load in (0.6, 0.75):
        cap = capacity(Scenario(wl), cal, max(400, count // 2), seeds[0])
        per: dict[str, list[dict[str, float]]] = {}
        for seed in seeds:
            reqs = make_requests(wl, cap * load, count, 1, seed + 7)
            base = simulate(Scenario(wl), "planetserve", reqs, cal, seed)
            equal_oracle = simulate(Scenario(wl), "oracle", reqs, cal, seed)
            split = {q: simulate(Scenario(wl, slow=slow), "oracle", reqs, cal, seed, slow_share=q) for q in SPLIT_GRID}
            best_q = min(split, key=lambda q: split[q]["mean_s"])
            cases: list[tuple[str, dict[str, float]]] = [
                ("round_robin", simulate(Scenario(wl, slow=slow, liars=liar), "round_robin", reqs, cal, seed)),
                ("least_load", simulate(Scenario(wl, slow=slow, liars=liar), "least_load", reqs, cal, seed)),
                ("planetserve", simulate(Scenario(wl, slow=slow, liars=liar), "planetserve", reqs, cal, seed)),
                ("planetserve (no liar)", simulate(Scenario(wl, slow=slow), "planetserve", reqs, cal, seed)),
                ("oracle: exact state, greedy", simulate(Scenario(wl, slow=slow), "oracle", reqs, cal, seed)),
                ("oracle: best static split", {**split[best_q], "split_share": best_q}),
                ("reference: the 6 fast nodes alone", simulate(Scenario(wl, nodes=6), "planetserve", reqs, cal, seed)),
                (
                    "reference: 8 equal nodes, same total capacity",
                    simulate(Scenario(wl, speed=8 / (6 + 2 / 3)), "planetserve", reqs, cal, seed),
                ),
                ("all equal: planetserve", base),
                ("all equal: oracle, exact state", equal_oracle),
            ]
            for label, r in cases:
                r = {
                    **r,
                    "vs_all_equal": r["mean_s"] / base["mean_s"],
                    "vs_split_oracle": r["mean_s"] / split[best_q]["mean_s"],
                    "vs_all_equal_oracle": r["mean_s"] / equal_oracle["mean_s"],
                }
                per.setdefault(label, []).append(r)
        for label, runs in per.items():
            row: dict[str, Any] = {"load": load, "policy": label, "seeds": len(runs)}
            for key in (
                "mean_s",
                "p99_s",
                "vs_all_equal",
                "vs_split_oracle",
                "vs_all_equal_oracle",
                "slow_share",
                "split_share",
            ):
                values = [run[key] for run in runs if key in run]
                if not values:
                    continue
                row[key] = statistics.median(values)
                if key.startswith("vs_"):
                    row[f"{key}_min"], row[f"{key}_max"] = min(values), max(values)
                    row[f"{key}_by_seed"] = values
            for key in ("fast_mean_s", "slow_mean_s", "share_node0", "share_node1"):
                values = [run[key] for run in runs if key in run]
                if values:
                    row[key] = statistics.median(values)
            rows.append(row)
    return rows


def _hetero_table(title: str, rows: list[dict[str, Any]]) -> None:
    ratios = ("vs_all_equal", "vs_split_oracle", "vs_all_equal_oracle")
    shown = [{**r, **{k: _spread(r, k) for k in ratios}} for r in rows]
    _table(
        title + " (medians over the seeds; ratios median [min, max])",
        shown,
        (
            "load",
            "policy",
            "mean_s",
            "p99_s",
            "vs_all_equal",
            "vs_split_oracle",
            "vs_all_equal_oracle",
            "slow_share",
            "split_share",
            "share_node1",
            "fast_mean_s",
            "slow_mean_s",
        ),
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    parser.add_argument("--no-measure", action="store_true", help="use the committed engine figures")
    parser.add_argument("--seed", type=int, default=11, help="the first seed")
    parser.add_argument(
        "--seeds", type=int, default=5, help="seeds run side by side (other arrivals each); medians and spreads"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--real", action="store_true", help="also the real multi-process run beside the simulation (a few minutes)"
    )
    parser.add_argument(
        "--real-only", action="store_true", help="only the real run; the other sections of --out are kept"
    )
    parser.add_argument("--real-requests", type=int, default=200, help="requests per policy in the real run")
    parser.add_argument(
        "--real-load", type=float, default=0.6, help="the real run's load (of its round robin capacity)"
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.real_only:
        kept = json.loads(args.out.read_text()) if args.out.exists() else {"bench": "forwarding"}
        kept["real"] = _real(args)
        args.out.write_text(json.dumps(kept, indent=2) + "\n")
        print(f"\nwrote {args.out} in {time.perf_counter() - started:.0f} s")
        return kept
    count = 600 if args.quick else 3000
    seeds = [args.seed + i for i in range(args.seeds)]
    cal = DEFAULT_CALIBRATION if args.no_measure else measure_calibration()
    print("calibration:", json.dumps(asdict(cal)))
    if os.name == "posix":
        print("load average at start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    loads = (0.6, 0.75, 0.9, 1.0)
    results: dict[str, Any] = {
        "bench": "forwarding",
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "load_average_at_start": list(os.getloadavg()) if os.name == "posix" else None,
        "calibration": asdict(cal),
        "requests_per_run": count,
        "seeds": seeds,
        "workloads": {k: asdict(v) for k, v in WORKLOADS.items()},
    }
    cols = (
        "load",
        "policy",
        "mean_s",
        "p50_s",
        "p99_s",
        "ttft_mean_s",
        "cache_hit_rate",
        "mean_vs_rr",
        "ttft_vs_rr",
        "p99_vs_rr",
    )
    for name in ("short", "long"):
        cap, rows = run_loads(Scenario(WORKLOADS[name]), cal, loads, count, seeds, (*POLICIES, "oracle"))
        results[f"{name}_capacity_rps"] = cap
        results[name] = rows
        shown = [{**r, **{k: _spread(r, k) for k in ("mean_vs_rr", "ttft_vs_rr", "p99_vs_rr")}} for r in rows]
        _table(
            f"workload {name}: 8 nodes, 1 client, round robin capacity {cap:.2f} req/s (load 1.0 = saturation); "
            f"medians over {len(seeds)} seeds, ratios as median [min, max]; oracle = exact state and true costs "
            "(a reference, not a client)",
            shown,
            cols,
        )

    wl = WORKLOADS["long"]
    results["heterogeneous"] = hetero_rows = heterogeneous(wl, cal, count, seeds)
    _hetero_table(
        "2 of 8 nodes 3x slower (node 1 also reports zero load); vs planetserve with all nodes equal, and vs the "
        "best static split of traffic between the classes (exact-state choice within each)",
        hetero_rows,
    )
    # Sensitivity: the same runs with a decode step whose cost does not grow with its batch. An ASSUMPTION (the
    # regime GPU serving is in at small batches), not a measurement: the step costs what one sequence's step was
    # measured to cost, whatever the batch.
    flat = Calibration(
        cal.prefill_fixed_s,
        cal.prefill_per_token_s,
        cal.decode_fixed_s + cal.decode_per_seq_s,
        0.0,
        "SENSITIVITY (assumed, not measured): the measured calibration with a batch-flat decode step "
        "(per-sequence decode cost 0, a step costs what one sequence's step was measured to cost)",
    )
    results["heterogeneous_batch_flat_sensitivity"] = {
        "assumption": flat.source,
        "calibration": asdict(flat),
        "rows": (flat_rows := heterogeneous(wl, flat, count, seeds)),
    }
    _hetero_table(
        "SENSITIVITY, NOT MEASURED: the same with an assumed batch-flat decode step (per-sequence decode cost 0)",
        flat_rows,
    )

    # Independent clients with stale heartbeats.
    multi_rows = []
    cap = capacity(Scenario(wl), cal, max(400, count // 2), args.seed)
    for beat in (0.25, 1.0):
        sc = Scenario(wl, clients=8, refresh_s=beat, publish_s=beat)
        ratios, p99s, rr_means, ps_means = [], [], [], []
        for seed in seeds:
            reqs = make_requests(wl, cap * 0.9, count, 8, seed + 3)
            rr = simulate(sc, "round_robin", reqs, cal, seed)
            ps = simulate(sc, "planetserve", reqs, cal, seed)
            rr_means.append(rr["mean_s"])
            ps_means.append(ps["mean_s"])
            ratios.append(ps["mean_s"] / rr["mean_s"])
            p99s.append(ps["p99_s"] / rr["p99_s"])
        multi_rows.append(
            {
                "heartbeat_s": beat,
                "rr_mean_s": statistics.median(rr_means),
                "ps_mean_s": statistics.median(ps_means),
                "ps_vs_rr": statistics.median(ratios),
                "ps_vs_rr_min": min(ratios),
                "ps_vs_rr_max": max(ratios),
                "ps_p99_vs_rr": statistics.median(p99s),
                "ps_p99_vs_rr_min": min(p99s),
                "ps_p99_vs_rr_max": max(p99s),
            }
        )
    results["independent_clients"] = multi_rows
    _table(
        f"8 independent clients at 90% load, heartbeats 0.25 s and 1 s old; medians over {len(seeds)} seeds",
        [{**r, "ps_vs_rr": _spread(r, "ps_vs_rr"), "ps_p99_vs_rr": _spread(r, "ps_p99_vs_rr")} for r in multi_rows],
        ("heartbeat_s", "rr_mean_s", "ps_mean_s", "ps_vs_rr", "ps_p99_vs_rr"),
    )

    # Scale: 1,000 nodes, 100 clients.
    big_nodes, big_clients = (200, 20) if args.quick else (1000, 100)
    sc = Scenario(
        WorkloadScaled(wl, big_nodes), nodes=big_nodes, clients=big_clients, refresh_s=1.0, sample_candidates=16
    )
    big_count = count
    cap = capacity(sc, cal, max(2000, big_nodes * 4), args.seed)
    reqs = make_requests(sc.workload, cap * 0.9, big_count * 3, big_clients, args.seed + 5)
    rr = simulate(sc, "round_robin", reqs, cal, args.seed)
    ps = simulate(sc, "planetserve", reqs, cal, args.seed)
    beat_bytes = heartbeat_bytes(sc.workload.cache_tokens // BLOCK)
    fetched = 2 * sc.sample_candidates  # a client keeps heartbeats of about twice the nodes it samples per request
    scale = {
        "nodes": big_nodes,
        "clients": big_clients,
        "heartbeat_s": 1.0,
        "rr_mean_s": rr["mean_s"],
        "ps_mean_s": ps["mean_s"],
        "ps_vs_rr": ps["mean_s"] / rr["mean_s"],
        "heartbeat_bytes_max": beat_bytes,
        "heartbeats_fetched_per_s": fetched,
        "heartbeat_bytes_per_client_per_s": beat_bytes * fetched / 1.0,
    }
    results["scale"] = scale
    _table(
        f"scale: {big_nodes} nodes, {big_clients} clients, 90% load (each client samples 16 nodes per request)",
        [scale],
        tuple(scale),
    )
    if args.real:
        results["real"] = _real(args)
    results["wall_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out} in {results['wall_s']:.0f} s")
    return results


def _real(args: argparse.Namespace) -> dict[str, Any]:
    """The real multi-process run beside the simulation at its scale (``bench/forwarding_real.py``); prints it."""
    from forwarding_real import run_real

    real = run_real(
        policies=("round_robin", "least_load", "planetserve"),
        load=args.real_load,
        count=args.real_requests,
        seed=args.seed,
    )
    cols = ["policy", "failed", "completion_tokens_mean"]
    for metric in ("mean_s", "p50_s", "p99_s", "ttft_mean_s", "cache_hit_rate"):
        cols += [f"real_{metric}", f"sim_{metric}"]
    cols += [c for c in ("real_mean_vs_rr", "sim_mean_vs_rr") if c in real["rows"][0]]
    _table(
        f"real run: {real['nodes']} model nodes + {real['relays']} relays as processes, {real['rows'][0]['requests']} "
        f"requests per policy at {real['load']:.0%} of real RR capacity ({real['rate_rps']:.2f} req/s); "
        f"network {real['network_overhead_s'] * 1e3:.0f} ms per request; {real['machine']}",
        real["rows"],
        cols,
    )
    return real


def heartbeat_bytes(chunks: int) -> int:
    """Bytes of a real signed version-2 heartbeat whose summary advertises ``chunks`` prefix chunks (at most the
    summary's 4,096), as ``GET /overlay/v1/heartbeat`` serves it (JSON, base64 filter, signature)."""
    import secrets

    from eth_account import Account

    from node.inference import EngineStats
    from node.overlay._heartbeat import CacheSummaryBuilder, HeartbeatPublisher

    builder = CacheSummaryBuilder()
    hashes = tuple(secrets.token_bytes(8) for _ in range(min(chunks, builder.max_entries)))
    for _ in range(builder.k_distinct):
        builder.observe(hashes)
    stats = EngineStats(
        model_id="0x" + "ab" * 32,
        queued_requests=64,
        running_requests=8,
        queued_tokens=262_144,
        cached_prefix_hashes=hashes,
        cache_bytes=0,
        prefill_tokens_computed=0,
        prefill_tokens_cached=0,
        tokens_per_second=0.0,
        decode_backlog_tokens=32_768,
        seconds_per_decode_token=0.0123456789,
    )
    publisher = HeartbeatPublisher(
        account=Account.create(), model_id=stats.model_id, stats=lambda: stats, builder=builder
    )
    return len(publisher.current().model_dump_json().encode())


def WorkloadScaled(wl: Workload, nodes: int) -> Workload:
    """The long workload with as many documents per node as at 8 nodes."""
    return Workload(
        wl.name + f"-x{nodes}", wl.docs * nodes // 8, wl.doc_tokens, wl.suffix_tokens, wl.output_tokens, wl.cache_tokens
    )


if __name__ == "__main__":
    main()
