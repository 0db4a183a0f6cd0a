"""Forwarding policies and the client's load tracker (``node/client/_policy.py``): pure decisions on node views."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import pytest

from node.client._policy import (
    PREFILL_EXCESS_SLACK,
    PRIOR_BATCH_SHARE,
    STEP_TOKENS,
    LeastLoad,
    LoadReport,
    LoadTracker,
    NodeView,
    NoEligibleNode,
    PlanetServePolicy,
    PlanetServeSettings,
    PrefixOnly,
    RoundRobin,
    StepFit,
    estimate,
    externality,
    make_policy,
    marginal_cost,
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


def test_planetserve_by_default_keeps_the_prefix_holder_that_is_the_most_loaded_node() -> None:
    # Eight nodes; the one holding a 4,000-token prefix has the longest queue (by the cache-blind estimate it is the
    # most loaded), yet its cached prompt makes it the cheapest: excluding it would force a full prefill elsewhere.
    rng = random.Random(5)
    views = [_view(f"n{i}", queued_tokens=200 + 10 * i) for i in range(7)]
    views.append(_view("holder", queued_tokens=1500, matched_tokens=4000))
    assert Counter(PlanetServePolicy().choose(views, 4100, rng) for _ in range(100))[7] == 100
    excluding = PlanetServePolicy(PlanetServeSettings(exclude_fraction=0.25))
    assert Counter(excluding.choose(views, 4100, rng) for _ in range(100))[7] == 0


def test_power_of_two_choices_spreads_independent_clients_over_equal_nodes() -> None:
    views = [_view(f"n{i}") for i in range(8)]
    policy = PlanetServePolicy(PlanetServeSettings(choices=2))
    picks = Counter(policy.choose(views, 100, random.Random(seed)) for seed in range(400))
    assert len(picks) == 8 and max(picks.values()) < 100  # no herd onto one node


def test_load_tracker_catches_a_node_that_under_reports_its_queue() -> None:
    tracker = LoadTracker(prior_seconds_per_token=1e-3)
    # Honest: reports 900 queued; its first token comes after those and its own 100 tokens (plus one step).
    honest = tracker.view("honest", report=LoadReport(issued_at=0.0, queued_tokens=900))
    tracker.first_token(tracker.dispatched(honest, prompt_tokens=100, max_tokens=0, at=1.0), ttft_s=1.0)
    # Liar: reports 0 queued but has the same hidden queue, so it answers just as late.
    liar = tracker.view("liar", report=LoadReport(issued_at=0.0, queued_tokens=0))
    tracker.first_token(tracker.dispatched(liar, prompt_tokens=100, max_tokens=0, at=1.0), ttft_s=1.0)
    per_token = {n: tracker.seconds_per_token(n) for n in ("honest", "liar")}
    assert per_token["liar"] == pytest.approx(per_token["honest"] * (900 + 100 + STEP_TOKENS) / (100 + STEP_TOKENS))
    # Its estimate for the next 100-token request is what it really cost (1 s), not what it claims.
    view = tracker.view("liar", report=LoadReport(issued_at=2.0, queued_tokens=0))
    assert estimate(view, 100, 0) == pytest.approx(1.0)
    # An unmeasured node is neither favoured nor avoided: it gets the mean of the measured ones.
    assert tracker.seconds_per_token("new") == pytest.approx(sum(per_token.values()) / 2)


def test_a_reported_prefill_speed_prices_a_slow_node_before_anything_was_sent_there() -> None:
    tracker = LoadTracker(prior_seconds_per_token=1e-3)
    fast = LoadReport(issued_at=0.0, seconds_per_prefill_token=5e-5)
    slow = LoadReport(issued_at=0.0, seconds_per_prefill_token=1.5e-4)
    # Nothing measured yet: the reports alone, so the slow node is 3x dearer per token from the start.
    assert tracker.view("slow", report=slow).seconds_per_token == pytest.approx(1.5e-4)
    # Answers from the fast node, each twice what its report predicted (the path, the queue's decode steps): the
    # shared correction doubles every node's estimate, the slow node's too, though it was never measured.
    for i in range(30):
        view = tracker.view("fast", report=fast)
        sent = tracker.dispatched(view, prompt_tokens=1000, max_tokens=0, at=float(i))
        tracker.first_token(sent, ttft_s=2 * 5e-5 * (1000 + STEP_TOKENS))
        tracker.finished(sent)
    assert tracker.view("fast", report=fast).seconds_per_token == pytest.approx(1e-4)
    assert tracker.view("slow", report=slow).seconds_per_token == pytest.approx(3e-4)
    # A node without the field (an older heartbeat, or nothing prefilled yet), not measured: the reports' mean, times
    # the correction (the prior of 1 ms a token would make it look 5 times dearer than the nodes that report).
    assert tracker.view("old", report=LoadReport(issued_at=0.0)).seconds_per_token == pytest.approx(2e-4)
    # Once measured, the client's own TTFT-per-token estimate.
    old = tracker.view("old", report=LoadReport(issued_at=0.0))
    tracker.first_token(tracker.dispatched(old, prompt_tokens=1000, max_tokens=0, at=40.0), ttft_s=0.5)
    assert tracker.view("old", report=LoadReport(issued_at=0.0)).seconds_per_token == pytest.approx(
        0.5 / (1000 + STEP_TOKENS)
    )


def test_a_node_that_hides_its_queue_is_caught_by_its_own_first_tokens_and_honest_noise_is_not_counted() -> None:
    tracker = LoadTracker()
    report = LoadReport(issued_at=0.0, queued_tokens=0, seconds_per_prefill_token=1e-4)
    predicted = 1e-4 * (100 + STEP_TOKENS)
    for i in range(40):
        for node, late in (("honest", 1.0), ("noisy", 1.3), ("liar", 10.0)):
            sent = tracker.dispatched(tracker.view(node, report=report), prompt_tokens=100, max_tokens=0, at=float(i))
            tracker.first_token(sent, ttft_s=late * predicted)
            tracker.finished(sent)
    shared = tracker.view("unmeasured", report=report).seconds_per_token
    # Within the slack of the shared correction a node is priced as the shared correction says (its excess is noise).
    assert tracker.view("honest", report=report).seconds_per_token == pytest.approx(shared)
    assert tracker.view("noisy", report=report).seconds_per_token == pytest.approx(shared)
    # The liar answers 10x later than its report predicts: its excess over the shared figure, beyond the slack, counts.
    liar = tracker.view("liar", report=report, now=40.0).seconds_per_token
    assert liar > 2 * shared
    assert tracker.prefill_correction("liar", now=40.0) > tracker.prefill_correction("honest", now=40.0) * (
        10 / 4 / PREFILL_EXCESS_SLACK
    )
    # Aged: a node not measured for a long while is priced like the others again, so it is tried and measured anew.
    assert tracker.view("liar", report=report, now=10_000.0).seconds_per_token == pytest.approx(shared)


def test_a_decode_backlog_makes_a_node_with_a_quick_first_token_cost_more() -> None:
    # Both nodes prefill nothing ahead; one is decoding 8 long replies (its TTFT stays short under chunked prefill).
    idle = _view("idle", seconds_per_decode_token=2e-3)
    busy = _view("busy", seconds_per_decode_token=2e-3, running_requests=8, decode_backlog_tokens=8 * 500)
    assert estimate(busy, 64, 100) == pytest.approx(estimate(idle, 64, 100) + 2e-3 * 8 * 100)
    # Only what overlaps the request's own 100 tokens counts: short replies ahead weigh their own length.
    nearly_done = _view("done", seconds_per_decode_token=2e-3, running_requests=8, decode_backlog_tokens=8 * 5)
    assert estimate(nearly_done, 64, 100) == pytest.approx(estimate(idle, 64, 100) + 2e-3 * 40)
    picks = Counter(PlanetServePolicy().choose([busy, idle], 64, random.Random(s), 100) for s in range(50))
    assert picks == Counter({1: 50})


def test_the_clients_correction_catches_a_node_that_hides_its_decode_backlog() -> None:
    tracker = LoadTracker()
    honest = tracker.view("honest", report=LoadReport(issued_at=0.0, seconds_per_decode_token=1e-3))
    liar = tracker.view("liar", report=LoadReport(issued_at=0.0, seconds_per_decode_token=1e-3))
    for _ in range(10):
        # Honest: alone, as reported, 1 ms a token. Liar: reports nothing running but decodes 7 others: 8x slower.
        tracker.finished(tracker.dispatched(honest, prompt_tokens=10, max_tokens=50, at=1.0), decode_s=0.049, tokens=50)
        tracker.finished(tracker.dispatched(liar, prompt_tokens=10, max_tokens=50, at=1.0), decode_s=0.392, tokens=50)
    assert tracker.correction("honest") == pytest.approx(1.0)
    assert tracker.correction("liar") == pytest.approx(8.0)
    fresh = tracker.view("liar", report=LoadReport(issued_at=2.0, seconds_per_decode_token=1e-3))
    assert fresh.seconds_per_decode_token == pytest.approx(8e-3)
    # A node whose heartbeat has no decode speed (version 1) is estimated from the client's own measurement.
    blind = tracker.view("liar", report=LoadReport(issued_at=2.0))
    assert (
        blind.seconds_per_decode_token == pytest.approx(tracker.measured_decode_s("liar"))
        and blind.seconds_per_decode_token > 0
    )


def test_the_views_add_only_the_clients_own_requests_sent_after_the_report_was_issued() -> None:
    tracker = LoadTracker()
    first = tracker.dispatched(tracker.view("a", report=None), prompt_tokens=300, max_tokens=20, at=1.0)
    second = tracker.dispatched(tracker.view("a", report=None), prompt_tokens=200, max_tokens=30, at=3.0)
    # A report issued at 2.0 already shows the first request; the second it cannot know of.
    report = LoadReport(issued_at=2.0, queued_tokens=1000, requests=4, decode_backlog_tokens=400)
    view = tracker.view("a", report=report)
    assert (view.queued_tokens, view.running_requests, view.decode_backlog_tokens) == (1200, 5, 430)
    # With no report at all, every request in flight counts.
    assert tracker.view("a", report=None).queued_tokens == 500
    tracker.finished(second)
    tracker.finished(first)
    assert tracker.inflight("a") == 0 and tracker.view("a", report=report).queued_tokens == 1000


def test_independent_clients_on_the_same_view_of_near_equal_nodes_spread_instead_of_herding() -> None:
    views = [_view(f"n{i}", queued_tokens=1000 + 10 * i) for i in range(8)]
    picks = Counter(PlanetServePolicy().choose(views, 100, random.Random(seed)) for seed in range(400))
    assert len(picks) >= 6 and max(picks.values()) < 150


def test_unknown_policy_names_and_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("fastest")
    with pytest.raises(ValueError):
        PlanetServeSettings(exclude_fraction=1.0)
    with pytest.raises(ValueError):
        LoadTracker(alpha=0.0)


def test_old_measurements_age_so_a_node_avoided_after_slow_answers_is_tried_again() -> None:
    tracker = LoadTracker(half_life_s=10.0)
    for node, ttft in (("fast", 0.1), ("slow", 1.0)):
        view = tracker.view(node, report=LoadReport(issued_at=0.0))
        tracker.first_token(tracker.dispatched(view, prompt_tokens=100, max_tokens=0, at=0.0), ttft_s=ttft)
    mean = (tracker.seconds_per_token("fast") + tracker.seconds_per_token("slow")) / 2
    # Measured now, it is judged by its measurement; ten seconds later half of the gap to the mean is gone.
    assert tracker.seconds_per_token("slow", now=0.0) == pytest.approx(tracker.seconds_per_token("slow"))
    gap = tracker.seconds_per_token("slow") - mean
    assert tracker.seconds_per_token("slow", now=10.0) == pytest.approx(mean + gap / 2)
    assert tracker.seconds_per_token("slow", now=1000.0) == pytest.approx(mean, rel=1e-6)
    with pytest.raises(ValueError):
        LoadTracker(half_life_s=0.0)


def test_a_node_that_reports_no_decode_speed_yet_is_not_taken_for_free() -> None:
    """A node that has not decoded since it started reports 0 ("unknown"); counting no decode time for it made it
    look cheaper than the node holding the prompt's prefix (the demo's second shared-prefix prompt left the holder)."""
    from node.client._policy import PlanetServePolicy, with_known_decode

    holder = NodeView(node_id="a", matched_tokens=32, seconds_per_token=1.7e-4, seconds_per_decode_token=7e-3)
    fresh = NodeView(node_id="b", seconds_per_token=1.7e-4, seconds_per_decode_token=0.0)
    filled = with_known_decode([holder, fresh])
    assert filled[1].seconds_per_decode_token == pytest.approx(7e-3) and filled[0] == holder
    picks = {PlanetServePolicy().choose([holder, fresh], 42, random.Random(seed), 8) for seed in range(50)}
    assert picks == {0}
    # Nothing known anywhere: nothing is invented.
    assert with_known_decode([fresh, fresh]) == [fresh, fresh]


def _fitted_tracker(fixed_s: float, per_seq_s: float) -> LoadTracker:
    """A tracker that has read 40 heartbeats from node "fit", over batches 1..8, of an engine whose decode step costs
    ``fixed_s + per_seq_s x batch`` (each reports the step's time over its batch, as the engine does)."""
    tracker = LoadTracker()
    for i in range(40):
        batch = 1 + i % 8
        per_token = (fixed_s + per_seq_s * batch) / batch
        tracker.view("fit", report=LoadReport(issued_at=float(i), seconds_per_decode_token=per_token, batch=batch))
    return tracker


def test_the_step_fit_recovers_the_share_of_a_decode_step_that_grows_with_the_batch() -> None:
    fit = StepFit()
    for i in range(40):
        batch = 1 + i % 8
        fit.add(batch, 2e-3 + 0.5e-3 * batch)
    assert fit.share() == pytest.approx(0.5e-3 / 2.5e-3)
    # Too few reports, or all at one batch: the slope is not identified and the prior stands.
    few, flat = StepFit(), StepFit()
    for _ in range(40):
        flat.add(4, 4e-3)
    few.add(1, 2.5e-3)
    few.add(8, 6e-3)
    assert few.share() is None and flat.share() is None
    assert LoadTracker().batch_share("anyone") == PRIOR_BATCH_SHARE


def test_reports_at_different_batches_are_brought_to_a_batch_of_one() -> None:
    """The engine reports a step's time per sequence, which falls as its batch grows when part of a step is fixed:
    taken as a constant, a node decoding two requests looked cheaper than one decoding a single request."""
    fixed, per_seq, m = 2e-3, 0.5e-3, 100
    tracker = _fitted_tracker(fixed, per_seq)
    one = tracker.view(
        "one",
        report=LoadReport(
            issued_at=0.0, seconds_per_decode_token=fixed + per_seq, batch=1, requests=1, decode_backlog_tokens=m
        ),
    )
    two = tracker.view(
        "two",
        report=LoadReport(
            issued_at=0.0,
            seconds_per_decode_token=(fixed + 2 * per_seq) / 2,
            batch=2,
            requests=2,
            decode_backlog_tokens=2 * m,
        ),
    )
    # The same engine: the same speed at a batch of one, whatever batch each report was measured at.
    assert one.seconds_per_decode_token == pytest.approx(fixed + per_seq)
    assert two.seconds_per_decode_token == pytest.approx(fixed + per_seq)
    assert one.batch_share == pytest.approx(per_seq / (fixed + per_seq))
    # The request's own time there is its m steps, each growing by per_seq for each co-runner: exact here.
    assert estimate(one, 0, m) - estimate(one, 0, 0) == pytest.approx(m * (fixed + 2 * per_seq))
    assert estimate(two, 0, m) > estimate(one, 0, m)
    assert Counter(LeastLoad().choose([two, one], 0, random.Random(s), m) for s in range(20)) == Counter({1: 20})
    # Without the fit (the prior: a step's cost proportional to its batch) the order was the wrong way round.
    prior = LoadTracker()
    one0 = prior.view(
        "one",
        report=LoadReport(
            issued_at=0.0, seconds_per_decode_token=fixed + per_seq, batch=1, requests=1, decode_backlog_tokens=m
        ),
    )
    two0 = prior.view(
        "two",
        report=LoadReport(
            issued_at=0.0,
            seconds_per_decode_token=(fixed + 2 * per_seq) / 2,
            batch=2,
            requests=2,
            decode_backlog_tokens=2 * m,
        ),
    )
    assert estimate(two0, 0, m) < estimate(one0, 0, m)


def test_the_externality_term_picks_the_node_where_the_request_slows_fewer_co_runners() -> None:
    m = 100
    # "busy" decodes two long replies: the request's own time there is m + 0.5 x 2m steps of 1 ms = 0.2 s, and it
    # slows each of them by 0.5 ms a step for m steps (0.1 s in all). "idle" is slower (2.1 ms a step) but alone:
    # 0.21 s, and slows nobody.
    busy = _view(
        "busy",
        seconds_per_decode_token=1e-3,
        batch_share=0.5,
        running_requests=2,
        decode_backlog_tokens=2 * m,
        seconds_per_token=0.0,
    )
    idle = _view("idle", seconds_per_decode_token=2.1e-3, batch_share=0.5, seconds_per_token=0.0)
    assert estimate(busy, 0, m) == pytest.approx(0.2) and externality(busy, 0, m) == pytest.approx(0.1)
    assert estimate(idle, 0, m) == pytest.approx(0.21) and externality(idle, 0, m) == 0.0
    assert marginal_cost(busy, 0, m) == pytest.approx(0.3)
    for policy, selfish in (
        (
            PlanetServePolicy(PlanetServeSettings(sample_slack=1.0)),
            PlanetServePolicy(PlanetServeSettings(sample_slack=1.0, externality=False)),
        ),
        (LeastLoad(), LeastLoad(externality=False)),
    ):
        assert {policy.choose([busy, idle], 0, random.Random(s), m) for s in range(20)} == {1}
        assert {selfish.choose([busy, idle], 0, random.Random(s), m) for s in range(20)} == {0}
    # On a batch-flat node (share 0) co-runners are not slowed: no externality, however long its backlog.
    flat = _view(
        "flat", seconds_per_decode_token=1e-3, batch_share=0.0, running_requests=8, decode_backlog_tokens=8 * m
    )
    assert externality(flat, 0, m) == 0.0


def test_a_long_uncached_prompt_goes_where_its_prefill_stalls_fewer_requests() -> None:
    """Chunked prefill runs in the node's steps: every request there waits for the new prompt's chunks once more."""
    crowded = _view("crowded", seconds_per_token=1e-4, running_requests=8)
    quiet = _view("quiet", seconds_per_token=1e-4, running_requests=1, queued_tokens=200)
    # Own time: the crowded node has no prefill queue, so it is the quicker for the request itself ...
    assert estimate(crowded, 2000, 0) < estimate(quiet, 2000, 0)
    # ... but its 2,000 tokens delay 8 requests there, against 1 on the quiet node.
    assert externality(crowded, 2000, 0) == pytest.approx(1e-4 * 2000 * 8)
    assert externality(quiet, 2000, 0) == pytest.approx(1e-4 * 2000)
    rng = random.Random(4)
    assert {PlanetServePolicy().choose([crowded, quiet], 2000, rng) for _ in range(20)} == {1}
    assert {LeastLoad(externality=False).choose([crowded, quiet], 2000, rng) for _ in range(20)} == {0}
    # A prompt the node holds costs its co-runners only its uncached tail.
    holder = replace(crowded, matched_tokens=1984)
    assert externality(holder, 2000, 0) == pytest.approx(1e-4 * 16 * 8)
