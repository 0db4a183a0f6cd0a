"""The sequential test: designed from honest calibration scores, its CUSUM raises on a node cheating on 20% of
challenges within 10 epochs and, on honest streams drawn from the very model the bound assumes, raises no more often
than the stated per-epoch bound; detection delays match Wald's approximation; the state survives a JSON round trip
(a restart changes nothing); ``epoch_score`` fails an epoch exactly when the alarm is raised."""

from __future__ import annotations

import json
import math
import random

import pytest

from verifier import CusumParams, CusumState, SequentialTest, design_cusum, epoch_score
from verifier import _sequential as sequential
from verifier._errors import InvalidVerifierInput
from verifier._sequential import PASS_THRESHOLD, tail_exponent, unseen_rate

#: Honest calibration: 800 challenges that all scored 1 (what the shipped calibration measures, near enough).
HONEST = [1.0] * 800
PER_EPOCH = 16


def _cheated_score(rng: random.Random) -> float:
    """A cheated answer's score: uniform on [0.1, 1.0] (mean 0.55, the int8 substitute's measured mean)."""
    return rng.uniform(0.1, 1.0)


def _epochs_to_alarm(params: CusumParams, rng: random.Random, fraction: float, epochs: int) -> int | None:
    state = CusumState(threshold=params.threshold, kappa=params.kappa)
    for epoch in range(1, epochs + 1):
        for _ in range(params.challenges_per_epoch):
            state = state.update(_cheated_score(rng) if rng.random() < fraction else 1.0)
        if epoch_score(state) < PASS_THRESHOLD:
            return epoch
    return None


def test_design_states_its_false_alarm_bound_and_solves_the_tail_equation() -> None:
    params = design_cusum(HONEST, challenges_per_epoch=PER_EPOCH)
    eps = unseen_rate(len(HONEST))
    assert eps == pytest.approx(1 - 0.05 ** (1 / 800))
    # theta solves (1 - eps) exp(-theta kappa) + eps exp(theta (1 - kappa)) = 1
    mgf = (1 - eps) * math.exp(-params.theta * params.kappa) + eps * math.exp(params.theta * (1 - params.kappa))
    assert mgf == pytest.approx(1.0, rel=1e-6)
    assert params.false_alarm_bound == pytest.approx(1e-3, rel=1e-6)
    assert params.false_alarm_bound == pytest.approx(PER_EPOCH * math.exp(-params.theta * params.threshold))
    assert eps < params.kappa < 0.2 * 0.5
    assert tail_exponent(HONEST, eps, kappa=eps / 2) == 0.0  # an allowance below the honest mean admits no bound


def test_cusum_catches_a_20_percent_cheater_within_10_epochs_at_the_predicted_pace() -> None:
    params = design_cusum(HONEST, challenges_per_epoch=PER_EPOCH)
    rng = random.Random(12)
    runs = 400
    delays = [_epochs_to_alarm(params, rng, 0.2, 10) for _ in range(runs)]
    caught = [d for d in delays if d is not None]
    assert len(caught) / runs >= 0.99
    # Wald: challenges to alarm ~ (h + overshoot) / drift; the overshoot is at most one step (< 1 - kappa).
    drift = 0.2 * 0.45 - params.kappa
    low = params.threshold / drift / PER_EPOCH
    high = (params.threshold + 1.0) / drift / PER_EPOCH + 1.0  # + the epoch boundary
    mean = sum(caught) / len(caught)
    assert low * 0.8 <= mean <= high, (low, mean, high)


def test_honest_streams_from_the_bound_model_raise_no_more_often_than_stated() -> None:
    params = design_cusum(HONEST, challenges_per_epoch=PER_EPOCH)
    eps = params.unseen_rate
    rng = random.Random(5)
    # The honest model the bound assumes: score 1, except an unseen failure (score 0) with probability eps.
    # Enlarged 3x so that alarms happen and the count is informative; the bound for that model is recomputed.
    eps3 = 3 * eps
    theta3 = tail_exponent([0.0], eps3, params.kappa)
    bound3 = PER_EPOCH * math.exp(-theta3 * params.threshold)
    assert 0.01 < bound3 < 0.5
    epochs = 3000
    state = CusumState(threshold=params.threshold, kappa=params.kappa)
    alarms = 0
    for _ in range(epochs):
        for _ in range(PER_EPOCH):
            state = state.update(0.0 if rng.random() < eps3 else 1.0)
        if state.alarmed:
            alarms += 1
            state = CusumState(threshold=params.threshold, kappa=params.kappa)  # slashed, unjailed, fresh
    assert alarms / epochs <= bound3, (alarms, bound3)
    assert alarms > 0  # the simulation can fail: it does raise at this inflated rate
    # And at the real eps: none in as many epochs (expected well under one at 1e-3 per epoch).
    clean = CusumState(threshold=params.threshold, kappa=params.kappa)
    raised = 0
    for _ in range(epochs):
        for _ in range(PER_EPOCH):
            clean = clean.update(0.0 if rng.random() < eps else 1.0)
        raised += clean.alarmed
        if clean.alarmed:
            clean = CusumState(threshold=params.threshold, kappa=params.kappa)
    assert raised <= 1e-3 * epochs + 3 * math.sqrt(1e-3 * epochs)


def test_state_survives_a_json_round_trip_and_a_restart_changes_nothing() -> None:
    params = design_cusum(HONEST, challenges_per_epoch=PER_EPOCH)
    rng = random.Random(3)
    stream = {f"0x{n:040x}": [_cheated_score(rng) if rng.random() < 0.3 else 1.0 for _ in range(40)] for n in range(3)}
    straight = SequentialTest(params=params)
    restarted = SequentialTest(params=params)
    for node, scores in stream.items():
        straight.observe(node, scores)
        restarted.observe(node, scores[:20])
    text = restarted.to_json()
    json.loads(text)  # plain JSON
    restarted = SequentialTest.from_json(text)
    assert restarted.params == params and restarted.nodes == {n: restarted.state(n) for n in stream}
    for node, scores in stream.items():
        restarted.observe(node, scores[20:])
        assert restarted.state(node) == straight.state(node)
        assert restarted.epoch_score(node) == straight.epoch_score(node)
    restarted.reset("0x" + "0" * 40)
    assert restarted.state("0x" + "0" * 40).statistic == 0.0


@pytest.mark.parametrize(
    "text",
    ["", "[]", "{}", json.dumps({"version": 2}), json.dumps({"version": 1, "params": {}, "nodes": {}})],
)
def test_malformed_state_is_refused(text: str) -> None:
    with pytest.raises(InvalidVerifierInput):
        SequentialTest.from_json(text)


def test_a_state_with_too_many_nodes_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sequential, "MAX_NODES", 3)
    params = CusumParams(kappa=0.05, threshold=2.0)
    node = CusumState(threshold=2.0, kappa=0.05).to_dict()
    text = json.dumps({"version": 1, "params": params.to_dict(), "nodes": {str(i): node for i in range(4)}})
    with pytest.raises(InvalidVerifierInput):
        SequentialTest.from_json(text)
    test = SequentialTest(params=params)
    test.observe("a", [1.0])
    test.observe("b", [1.0])
    test.observe("c", [1.0])
    with pytest.raises(InvalidVerifierInput):
        test.observe("d", [1.0])
    test.observe("a", [0.5])  # a tracked node still updates


def test_epoch_score_fails_exactly_when_the_alarm_is_raised() -> None:
    h, kappa = 2.0, 0.0625  # binary fractions: the boundary arithmetic below is exact
    fresh = CusumState(threshold=h, kappa=kappa)
    assert epoch_score(fresh) == 1_000_000
    assert epoch_score(CusumState(statistic=1.0, threshold=h, kappa=kappa)) == 750_000
    just_below = CusumState(statistic=math.nextafter(h, 0.0), threshold=h, kappa=kappa)
    assert epoch_score(just_below) == PASS_THRESHOLD  # floor would give 499_999: held at a pass without an alarm
    # Reaching h through an update raises the alarm and fails the epoch.
    at = CusumState(statistic=h - 0.5, threshold=h, kappa=kappa).update(1.0 - (0.5 + kappa))
    assert at.statistic == h and at.alarmed
    assert epoch_score(at) == PASS_THRESHOLD - 1
    assert epoch_score(CusumState(statistic=5 * h, threshold=h, kappa=kappa, alarmed=True)) == 0
    # The alarm latches: honest answers afterwards lower S but the epoch still fails until reset.
    later = at.update(1.0).update(1.0)
    assert later.statistic < h and later.alarmed and epoch_score(later) < PASS_THRESHOLD


def test_design_refuses_honest_scores_it_cannot_separate_from_the_designed_cheat() -> None:
    with pytest.raises(InvalidVerifierInput):
        design_cusum([0.5] * 100)
    with pytest.raises(InvalidVerifierInput):
        design_cusum([])
    with pytest.raises(InvalidVerifierInput):
        CusumState(threshold=1.0, kappa=0.1).update(1.5)
