"""The sequential test across epochs: a one-sided CUSUM over per-challenge score deficits, per node.

One challenge says little about a node that cheats on a fifth of its requests: four in five of its answers are
honest. But every cheated answer leaves a deficit ``d = 1 - score`` that honest noise almost never does, so the
evidence is summed over challenges and epochs (Page's CUSUM): ``S <- max(0, S + d - kappa)``, alarm when
``S >= h``. ``kappa`` (the allowance) sits between the honest mean deficit and a cheater's; ``h`` (the threshold)
sets the false-alarm rate.

False alarms, stated and bounded. Model an honest node's deficits as the calibrated honest ones (the measured
distribution) mixed with an unseen worst case: with probability ``eps`` a deficit of 1, where ``eps`` is the 95%
upper bound on the rate of a failure never seen in ``n`` honest calibration challenges (``1 - 0.05 ** (1/n)``, the
"rule of three"). Let ``theta > 0`` solve ``E[exp(theta (d - kappa))] = 1`` under that model. The CUSUM is a Lindley
recursion, so from ``S = 0`` each ``S_t`` is stochastically below its stationary law, whose tail is at most
``exp(-theta h)`` (Kingman's bound). An epoch of ``m`` challenges therefore raises a false alarm with probability at
most ``m exp(-theta h)``; ``design_cusum`` picks ``h = ln(m / alpha) / theta`` for a target ``alpha`` (0.1% per
epoch by default), and among the allowances that admit such an ``h`` the one that minimises the expected challenges
to detect a designed-for cheater (a fraction of requests with a given deficit, Wald's ``h / drift``).

The chain sees one number per node and epoch: ``epoch_score(state)`` in ``[0, 1e6]``, below ``500_000`` (the
``Attestations`` threshold: a failing median slashes and jails) exactly when the alarm has been raised, and above it
``round(1e6 * (1 - S / (2 h)))``: 1e6 with no evidence, falling as evidence builds up. State is plain JSON
(``SequentialTest.to_json``) so the verifier's runner persists it across restarts.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from verifier._errors import InvalidVerifierInput

#: The attested score at and above which an epoch passes (the ``Attestations`` contract's threshold, 0.5 in 1e6).
PASS_THRESHOLD = 500_000
#: The largest attested score.
MAX_EPOCH_SCORE = 1_000_000
#: Default target: at most this probability of a false alarm per honest node per epoch.
TARGET_FALSE_ALARM = 1e-3
#: Most nodes one ``SequentialTest`` tracks (bounds its state file).
MAX_NODES = 100_000
#: State format version.
STATE_VERSION = 1
#: Confidence of the unseen-failure bound ``eps``.
_UNSEEN_CONFIDENCE = 0.95


def _finite(name: str, value: float, low: float, high: float) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
        raise InvalidVerifierInput(name, value, f"a number in [{low}, {high}]")


@dataclass(frozen=True, slots=True, kw_only=True)
class CusumParams:
    """A CUSUM design: the allowance, the threshold, and the false-alarm bound they were derived with."""

    #: Allowance subtracted per challenge, in score-deficit units, (0, 1).
    kappa: float
    #: Alarm threshold on the statistic, > 0.
    threshold: float
    #: Challenges per node per epoch (per verifier) the bound assumes, >= 1.
    challenges_per_epoch: int = 16
    #: Exponent of the tail bound (``theta``), per unit of statistic; 0 when set by hand.
    theta: float = 0.0
    #: Weight of the unseen worst case in the honest model (``eps``), 0..1.
    unseen_rate: float = 0.0
    #: Bound on the honest false-alarm probability per epoch, ``m exp(-theta h)`` (1 when not derived).
    false_alarm_bound: float = 1.0
    #: Honest calibration challenges the design rests on.
    honest_n: int = 0

    def __post_init__(self) -> None:
        _finite("kappa", self.kappa, 1e-9, 1.0 - 1e-9)
        _finite("threshold", self.threshold, 1e-9, 1e9)
        if not isinstance(self.challenges_per_epoch, int) or self.challenges_per_epoch < 1:
            raise InvalidVerifierInput("challenges_per_epoch", self.challenges_per_epoch, "an integer >= 1")

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "kappa": self.kappa,
            "threshold": self.threshold,
            "challenges_per_epoch": self.challenges_per_epoch,
            "theta": self.theta,
            "unseen_rate": self.unseen_rate,
            "false_alarm_bound": self.false_alarm_bound,
            "honest_n": self.honest_n,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> CusumParams:
        """Inverse of ``to_dict``."""
        return cls(
            kappa=float(raw["kappa"]),
            threshold=float(raw["threshold"]),
            challenges_per_epoch=int(raw.get("challenges_per_epoch", 16)),
            theta=float(raw.get("theta", 0.0)),
            unseen_rate=float(raw.get("unseen_rate", 0.0)),
            false_alarm_bound=float(raw.get("false_alarm_bound", 1.0)),
            honest_n=int(raw.get("honest_n", 0)),
        )


def unseen_rate(n: int, confidence: float = _UNSEEN_CONFIDENCE) -> float:
    """Upper ``confidence`` bound on the rate of an event never seen in ``n`` trials: ``1 - (1 - c) ** (1 / n)``."""
    if n < 1:
        raise InvalidVerifierInput("n", n, "at least one honest calibration challenge")
    return 1.0 - math.pow(1.0 - confidence, 1.0 / n)


def _histogram(deficits: Sequence[float]) -> list[tuple[float, float]]:
    """(deficit, weight) pairs: the measured deficits rounded *up* to 1e-6 and merged (honest ones are nearly all
    0), so the tail equation costs a few terms instead of one per calibration challenge."""
    counts = Counter(math.ceil(d * 1e6) / 1e6 for d in deficits)
    n = len(deficits)
    return [(d, c / n) for d, c in sorted(counts.items())]


def _mgf(theta: float, hist: Sequence[tuple[float, float]], eps: float, kappa: float) -> float:
    """``E[exp(theta (d - kappa))]`` under the honest model (measured deficits, plus ``eps`` at deficit 1)."""
    body = math.fsum(w * math.exp(theta * (d - kappa)) for d, w in hist)
    return (1.0 - eps) * body + eps * math.exp(theta * (1.0 - kappa))


def tail_exponent(deficits: Sequence[float], eps: float, kappa: float) -> float:
    """The positive root ``theta`` of ``E[exp(theta (d - kappa))] = 1``; 0 when there is none (mean >= kappa)."""
    return _tail_exponent(_histogram(deficits), eps, kappa)


def _tail_exponent(hist: Sequence[tuple[float, float]], eps: float, kappa: float) -> float:
    mean = (1.0 - eps) * math.fsum(d * w for d, w in hist) + eps
    if mean >= kappa:
        return 0.0
    hi = 1.0
    while _mgf(hi, hist, eps, kappa) < 1.0:
        hi *= 2.0
        if hi > 1e6:  # no deficit ever exceeds kappa (eps = 0): no alarm is possible, the bound is as good as 0
            return hi
    lo = 0.0
    for _ in range(80):
        mid = (lo + hi) / 2.0
        if _mgf(mid, hist, eps, kappa) < 1.0:
            lo = mid
        else:
            hi = mid
    return lo


def design_cusum(
    honest_scores: Sequence[float],
    *,
    challenges_per_epoch: int = 16,
    target_false_alarm: float = TARGET_FALSE_ALARM,
    cheat_fraction: float = 0.2,
    cheat_deficit: float = 0.5,
) -> CusumParams:
    """Allowance and threshold from calibrated honest scores (see the module docstring for the bound).

    The design alternative is a node that cheats on ``cheat_fraction`` of requests, each cheated answer losing
    ``cheat_deficit`` of score (the weakest cheat measured loses about half); ``kappa`` minimises ``h / drift`` for it.
    """
    if not honest_scores:
        raise InvalidVerifierInput("honest_scores", 0, "at least one honest calibration score")
    _finite("target_false_alarm", target_false_alarm, 1e-12, 0.5)
    _finite("cheat_fraction", cheat_fraction, 1e-6, 1.0)
    _finite("cheat_deficit", cheat_deficit, 1e-6, 1.0)
    deficits = [min(1.0, max(0.0, 1.0 - s)) for s in honest_scores]
    hist = _histogram(deficits)
    eps = unseen_rate(len(deficits))
    honest_mean = (1.0 - eps) * math.fsum(d * w for d, w in hist) + eps
    cheat_mean = (1.0 - cheat_fraction) * math.fsum(d * w for d, w in hist) + cheat_fraction * cheat_deficit
    best: CusumParams | None = None
    best_delay = math.inf
    steps = 200
    for i in range(1, steps):
        kappa = honest_mean + (cheat_mean - honest_mean) * i / steps
        if not 0.0 < kappa < 1.0:
            continue
        theta = _tail_exponent(hist, eps, kappa)
        if theta <= 0.0:
            continue
        h = math.log(challenges_per_epoch / target_false_alarm) / theta
        delay = h / (cheat_mean - kappa)
        if delay < best_delay:
            best_delay = delay
            best = CusumParams(
                kappa=kappa,
                threshold=h,
                challenges_per_epoch=challenges_per_epoch,
                theta=theta,
                unseen_rate=eps,
                false_alarm_bound=challenges_per_epoch * math.exp(-theta * h),
                honest_n=len(deficits),
            )
    if best is None:
        raise InvalidVerifierInput(
            "honest_scores", round(honest_mean, 6), "honest deficits too large to separate from the designed cheat"
        )
    return best


@dataclass(frozen=True, slots=True, kw_only=True)
class CusumState:
    """One node's CUSUM: the statistic and whether the alarm was raised (it stays raised until ``reset``)."""

    #: The CUSUM statistic ``S`` (>= 0), in score-deficit units.
    statistic: float = 0.0
    #: The alarm threshold ``h`` it is compared with.
    threshold: float
    #: The allowance ``kappa``.
    kappa: float
    #: Whether ``S`` reached ``h`` (latched).
    alarmed: bool = False
    #: Challenges observed since the last reset.
    challenges: int = 0

    def __post_init__(self) -> None:
        _finite("statistic", self.statistic, 0.0, 1e12)
        _finite("threshold", self.threshold, 1e-9, 1e9)
        _finite("kappa", self.kappa, 1e-9, 1.0)

    def update(self, score: float) -> CusumState:
        """The state after one more per-challenge score (0..1)."""
        _finite("score", score, 0.0, 1.0)
        s = max(0.0, self.statistic + (1.0 - score) - self.kappa)
        return replace(self, statistic=s, alarmed=self.alarmed or s >= self.threshold, challenges=self.challenges + 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "statistic": self.statistic,
            "threshold": self.threshold,
            "kappa": self.kappa,
            "alarmed": self.alarmed,
            "challenges": self.challenges,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> CusumState:
        """Inverse of ``to_dict``."""
        return cls(
            statistic=float(raw["statistic"]),
            threshold=float(raw["threshold"]),
            kappa=float(raw["kappa"]),
            alarmed=bool(raw["alarmed"]),
            challenges=int(raw["challenges"]),
        )


def epoch_score(state: CusumState) -> int:
    """The score to attest, 0..1_000_000: below ``PASS_THRESHOLD`` exactly when the alarm is raised.

    ``floor(1e6 * clip(1 - S / (2 h), 0, 1))``, then held at ``PASS_THRESHOLD`` or above without an alarm (``S`` just
    under ``h`` maps to 500_000, still a pass) and at ``PASS_THRESHOLD - 1`` or below with one.
    """
    raw = math.floor(MAX_EPOCH_SCORE * min(1.0, max(0.0, 1.0 - state.statistic / (2.0 * state.threshold))))
    if state.alarmed:
        return min(raw, PASS_THRESHOLD - 1)
    return max(raw, PASS_THRESHOLD)


@dataclass(slots=True)
class SequentialTest:
    """Per-node CUSUM states under one design, JSON-serialisable for the runner (at most ``MAX_NODES`` nodes)."""

    params: CusumParams
    nodes: dict[str, CusumState] = field(default_factory=dict)

    def state(self, node: str) -> CusumState:
        """The node's state (a fresh one for a node never observed)."""
        found = self.nodes.get(node)
        if found is None:
            return CusumState(threshold=self.params.threshold, kappa=self.params.kappa)
        return found

    def observe(self, node: str, scores: Iterable[float]) -> CusumState:
        """Fold a node's per-challenge scores (0..1 each, in the order they were answered) into its state."""
        state = self.state(node)
        if node not in self.nodes and len(self.nodes) >= MAX_NODES:
            raise InvalidVerifierInput("node", len(self.nodes), f"at most {MAX_NODES} tracked nodes")
        for score in scores:
            state = state.update(score)
        self.nodes[node] = state
        return state

    def epoch_score(self, node: str) -> int:
        """The node's attested score for the epoch (see ``epoch_score``)."""
        return epoch_score(self.state(node))

    def reset(self, node: str) -> None:
        """Forget a node's evidence (e.g. after it was slashed, jailed and unjailed)."""
        self.nodes.pop(node, None)

    def to_json(self) -> str:
        """The whole test as JSON (what ``from_json`` reads)."""
        return json.dumps(
            {
                "version": STATE_VERSION,
                "params": self.params.to_dict(),
                "nodes": {k: v.to_dict() for k, v in sorted(self.nodes.items())},
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> SequentialTest:
        """Inverse of ``to_json``; ``InvalidVerifierInput`` on a malformed state."""
        try:
            raw = json.loads(text)
            if raw.get("version") != STATE_VERSION:
                raise InvalidVerifierInput("version", raw.get("version"), f"state version {STATE_VERSION}")
            nodes = raw["nodes"]
            if len(nodes) > MAX_NODES:
                raise InvalidVerifierInput("nodes", len(nodes), f"at most {MAX_NODES}")
            return cls(
                params=CusumParams.from_dict(raw["params"]),
                nodes={str(k): CusumState.from_dict(v) for k, v in nodes.items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InvalidVerifierInput("state", None, f"a SequentialTest JSON state ({exc})") from exc
