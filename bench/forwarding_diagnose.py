"""Where the forwarding policies lose against an oracle: the simulation of ``bench/forwarding.py`` with one piece of
the client's information replaced at a time by the simulated nodes' exact state.

Run ``python bench/forwarding_diagnose.py`` (``--quick`` for a short run). It prints, per workload and load, each
variant's mean latency over round robin's as the median [min, max] over the seeds, on the committed calibration
(``forwarding.DEFAULT_CALIBRATION``) so that runs compare. The variants:

- ``planetserve`` / ``least_load``: as the ``Client`` runs them; ``... selfish``: the request's own time only, no
  externality term;
- ``... fresh heartbeats``: a report re-issued and fetched for every request (no staleness);
- ``planetserve, exact X``: the policy's views with X taken from the simulated node instead of the client's
  estimate: ``speeds`` (the calibration's true prefill and decode costs and batch share), ``matches`` (the tokens the
  node's cache really holds), ``load`` (its real queue, requests and backlog), ``all`` (the three);
- ``oracle``: ``forwarding.ExactOracle``, exact state and true costs, least marginal cost.

Nothing here is asserted: it is the measurement behind ``docs/forwarding.md`` ("Where the loss is").
"""

from __future__ import annotations

import argparse
import heapq
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import forwarding as fw

from node.client import _policy as pol

_NODES: list[fw.Node] = []
_CURRENT: dict[str, fw.Request] = {}


class _TrackedNode(fw.Node):
    """A simulated node that registers itself, so a variant can read the exact state of the run's nodes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _NODES.append(self)


class _ExactViews:
    """``planetserve`` on views whose named parts come from the simulated nodes' exact state."""

    name = "planetserve"

    def __init__(self, cal: fw.Calibration, parts: frozenset[str]) -> None:
        self.cal = cal
        self.parts = parts
        self.policy = pol.PlanetServePolicy()

    def choose(self, views: Sequence[pol.NodeView], prompt_tokens: int, rng: Any, max_tokens: int = 0) -> int:
        req = _CURRENT["request"]
        nodes = _NODES[-len(views) :]
        cal = self.cal
        exact = []
        for view in views:
            node = nodes[int(view.node_id)]
            changes: dict[str, Any] = {}
            if "matches" in self.parts:
                changes["matched_tokens"] = node.hit_blocks(req) * fw.BLOCK
            if "speeds" in self.parts:
                changes["seconds_per_token"] = cal.prefill_per_token_s * node.slowdown
                changes["seconds_per_decode_token"] = (cal.decode_fixed_s + cal.decode_per_seq_s) * node.slowdown
                changes["batch_share"] = cal.decode_per_seq_s / (cal.decode_fixed_s + cal.decode_per_seq_s)
            if "load" in self.parts:
                there = [*node.running, *node.waiting]
                queued = sum(r.prompt_tokens - r.computed for r in node.running if r.computed < r.prompt_tokens)
                queued += sum(r.prompt_tokens - node.hit_blocks(r) * fw.BLOCK for r in node.waiting)
                changes["queued_tokens"] = queued
                changes["running_requests"] = len(there)
                changes["decode_backlog_tokens"] = sum(r.output_tokens - r.generated for r in there)
            exact.append(replace(view, **changes))
        return self.policy.choose(exact, prompt_tokens, rng, max_tokens)


def _exact_factory(cal: fw.Calibration, parts: frozenset[str]) -> Callable[[], pol.Policy]:
    return lambda: _ExactViews(cal, parts)


def _install(cal: fw.Calibration) -> dict[str, Callable[[], pol.Policy]]:
    """Variants by name; the simulation's node class and event pop are wrapped to expose the exact state."""
    fw.Node = _TrackedNode  # type: ignore[misc]
    pop = heapq.heappop

    def tracking_pop(heap: list[Any]) -> Any:
        item = pop(heap)
        if item[2] == 0:  # an arrival: the request the policy is about to route
            _CURRENT["request"] = item[3]
        return item

    fw.heapq.heappop = tracking_pop  # type: ignore[attr-defined]
    variants: dict[str, Callable[[], pol.Policy]] = {
        "planetserve selfish": lambda: pol.PlanetServePolicy(pol.PlanetServeSettings(externality=False)),
        "least_load selfish": lambda: pol.LeastLoad(externality=False),
    }
    for parts in (("speeds",), ("matches",), ("load",), ("speeds", "matches", "load")):
        label = "all" if len(parts) == 3 else parts[0]
        variants[f"planetserve, exact {label}"] = _exact_factory(cal, frozenset(parts))
    make = pol.make_policy

    def patched(name: str) -> pol.Policy:
        return variants[name]() if name in variants else make(name)

    fw.make_policy = patched  # type: ignore[attr-defined]
    return variants


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests and seeds (a smoke run)")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    cal = fw.DEFAULT_CALIBRATION
    variants = _install(cal)
    count, seeds = (400, [11]) if args.quick else (2000, [11 + i for i in range(args.seeds)])
    names = ["round_robin", "least_load", "planetserve", *variants, "oracle"]
    for workload, loads in (("short", (0.6, 0.75)), ("long", (0.75, 0.9))):
        wl = fw.WORKLOADS[workload]
        cap = fw.capacity(fw.Scenario(wl), cal, max(400, count // 2), seeds[0])
        for load in loads:
            ratios: dict[str, list[float]] = {name: [] for name in [*names, "planetserve, fresh heartbeats"]}
            for seed in seeds:
                reqs = fw.make_requests(wl, cap * load, count, 1, seed + int(load * 100))
                base = fw.simulate(fw.Scenario(wl), "round_robin", reqs, cal, seed)["mean_s"]
                for name in names:
                    _NODES.clear()
                    ratios[name].append(fw.simulate(fw.Scenario(wl), name, reqs, cal, seed)["mean_s"] / base)
                fresh = fw.Scenario(wl, refresh_s=0.0, publish_s=0.0)
                ratios["planetserve, fresh heartbeats"].append(
                    fw.simulate(fresh, "planetserve", reqs, cal, seed)["mean_s"] / base
                )
            print(f"\n{workload} at {load:.0%} of round robin's capacity, mean latency / round robin's:")
            for name, values in ratios.items():
                print(f"  {name:32s} {statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]")


if __name__ == "__main__":
    main()
