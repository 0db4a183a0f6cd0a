"""Forwarding policies and the client's load tracker (``node/client/_policy.py``): pure decisions on node views."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from node.client._policy import (
    LeastLoad,
    LoadTracker,
    NodeView,
    NoEligibleNode,
    PlanetServePolicy,
    PlanetServeSettings,
    PrefixOnly,
    RoundRobin,
    make_policy,
)


def _view(name: str, **kw: object) -> NodeView:
    return NodeView(node_id=name, **kw)  # type: ignore[arg-type]


def test_round_robin_cycles_whatever_the_state() -> None:
    views = [_view("a", queued_tokens=10**6), _view("b"), _view("c")]
    policy = RoundRobin()
    assert [policy.choose(views, 10, random.Random(0)) for _ in range(6)] == [0, 1, 2, 0, 1, 2]


def test_least_load_and_prefix_only_pick_what_their_names_say() -> None:
    views = [
        _view("a", queued_tokens=900),
        _view("b", queued_tokens=100, matched_tokens=0),
        _view("c", matched_tokens=64),
    ]
    assert LeastLoad().choose(views, 10, random.Random(0)) == 2
    assert PrefixOnly().choose(views, 100, random.Random(0)) == 2


def test_planetserve_prefers_the_node_holding_the_prefix_unless_it_is_much_slower() -> None:
    rng = random.Random(1)
    policy = PlanetServePolicy(PlanetServeSettings(choices=0))
    holder = _view("holder", queued_tokens=200, matched_tokens=2000)
    idle = _view("idle", queued_tokens=0)
    # 2000 cached of 2100 tokens: the holder's estimate (200 + 100 tokens) beats the idle node's 2100.
    assert policy.choose([idle, holder], 2100, rng) == 1
    # The holder drowning in work: fall back to least load.
    swamped = _view("holder", queued_tokens=50_000, matched_tokens=2000)
    assert policy.choose([idle, swamped, _view("other", queued_tokens=10)], 2100, rng) in {0, 2}


def test_planetserve_excludes_nodes_below_the_reputation_floor_and_raises_when_none_is_left() -> None:
    rng = random.Random(2)
    policy = PlanetServePolicy()
    views = [_view("bad", reputation=0.05, matched_tokens=4000), _view("ok", reputation=0.5, queued_tokens=5000)]
    assert {policy.choose(views, 4000, rng) for _ in range(20)} == {1}
    with pytest.raises(NoEligibleNode):
        policy.choose([_view("bad", reputation=0.1)], 10, rng)


def test_planetserve_excludes_the_most_loaded_fraction_even_with_affinity() -> None:
    rng = random.Random(3)
    policy = PlanetServePolicy(PlanetServeSettings(exclude_fraction=0.25, affinity_slack=100.0))
    views = [_view(f"n{i}", queued_tokens=100 * i) for i in range(7)]
    views.append(_view("hot", queued_tokens=10**6, matched_tokens=64))
    assert Counter(policy.choose(views, 100, rng) for _ in range(200))[7] == 0


def test_power_of_two_choices_spreads_independent_clients_over_equal_nodes() -> None:
    views = [_view(f"n{i}") for i in range(8)]
    picks = Counter(PlanetServePolicy().choose(views, 100, random.Random(seed)) for seed in range(400))
    assert len(picks) == 8 and max(picks.values()) < 100  # no herd onto one node


def test_load_tracker_catches_a_node_that_under_reports_its_queue() -> None:
    tracker = LoadTracker(prior_seconds_per_token=1e-3)
    # Honest: reports 900 queued, its first token after (900 + 100) tokens at 1 ms each.
    tracker.first_token("honest", ttft_s=1.0, work_tokens=900 + 100)
    # Liar: reports 0 queued but has the same hidden queue, so it answers just as late.
    tracker.first_token("liar", ttft_s=1.0, work_tokens=0 + 100)
    honest = _view("honest", queued_tokens=900, seconds_per_token=tracker.seconds_per_token("honest"))
    liar = _view("liar", queued_tokens=0, seconds_per_token=tracker.seconds_per_token("liar"))
    assert tracker.seconds_per_token("liar") == pytest.approx(10 * tracker.seconds_per_token("honest"))
    # Its estimate for the next 100-token request is what it really costs (1 s), not the 0.1 s it claims.
    assert liar.seconds_per_token * (liar.queued_tokens + 100) == pytest.approx(1.0)
    assert PlanetServePolicy(PlanetServeSettings(choices=0)).choose([liar, honest], 100, random.Random(0)) in {0, 1}
    # An unmeasured node is neither favoured nor avoided: it gets the mean of the measured ones.
    assert tracker.seconds_per_token("new") == pytest.approx((1e-3 + 1e-2) / 2)


def test_load_tracker_counts_its_own_requests_in_flight() -> None:
    tracker = LoadTracker()
    tracker.dispatched("a", 300)
    tracker.dispatched("a", 200)
    tracker.finished("a", 300)
    assert tracker.inflight_tokens("a") == 200
    tracker.finished("a", 10_000)
    assert tracker.inflight_tokens("a") == 0


def test_unknown_policy_names_and_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("fastest")
    with pytest.raises(ValueError):
        PlanetServeSettings(exclude_fraction=1.0)
    with pytest.raises(ValueError):
        LoadTracker(alpha=0.0)
