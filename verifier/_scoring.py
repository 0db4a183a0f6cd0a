"""Scoring one challenge: how much of a node's answer the verifier's own reference engine can vouch for, in [0, 1].

Likelihood alone cannot tell a good substitute: the int8 model's answers have a mean per-token log-prob within 0.03
nats of the real model's (``bench/results/quality.json``), well inside the spread of honest sampled answers. What a
substitute cannot fake is the *computation*: every request carries a seed, so the verifier can run the same request
itself and get the very tokens an honest node produced, and every answer carries the node's per-token log-probs, which
an honest node computed with the real weights and the verifier can recompute (teacher-forced ``score``) to within
float noise. So a challenge is scored from four parts:

- **fidelity** (weight ``W_FIDELITY``): does every reported log-prob match the reference's teacher-forced log-prob
  of that token within the calibrated tolerance? The worst token decides (honest noise keeps *every* token within
  it; a cheaper model agrees on the near-certain tokens and is far off on the others), and beyond the tolerance
  credit decays exponentially in units of it. A cheaper model reports its own log-probs (off by ~1e-2 nats, hundreds
  of tolerances); a node that makes them up is off by more. This works at any temperature and after any divergence.
- **replay** (``W_REPLAY``): the share of tokens that agree with the verifier's seeded regeneration before the first
  divergence. A divergence is *explained* when it is what float noise can do: under greedy decoding, the reference's
  log-prob of its own token exceeds that of the node's token by at most ``tie_gap`` (a near tie). The tokens after an
  explained divergence cannot be replayed (the node's context is now different), so they are credited by the
  fidelity and likelihood of that tail instead. Under sampling the engine's random draw is not visible through the
  ``Engine`` protocol, so a divergence is explained when the node's token is not implausible (reference log-prob at
  least ``SAMPLED_PLAUSIBLE_LOGPROB``); the weight then rests on fidelity (stated in ``docs/verification.md``).
- **likelihood** (``W_LIKELIHOOD``): the answer's mean teacher-forced log-prob against the reference's own replay's
  mean (like with like: the same temperature, top-p and seed), ``min(1, exp(delta / likelihood_scale))``. A sampled
  honest answer has a low likelihood by design, but so does the replay it equals.
- **finish** (a factor, 0 or 1): "length" only with exactly ``max_tokens`` tokens, never more tokens than asked, no
  "abort", and when every token agrees with the replay, the same finish reason (end-of-sequence where it ended).

``score = finish * (W_FIDELITY * fidelity + W_REPLAY * replay + W_LIKELIHOOD * likelihood)``: 1 for an honest answer,
near 0 for canned or replayed text, and in between for a cheaper model whose first tokens agree.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import statistics
from dataclasses import dataclass
from typing import Any

from node.inference import Engine, GenerationRequest, InvalidParams, SamplingParams
from verifier._calibration import TORCH_FP32, Calibration, Tolerance
from verifier._errors import InvalidVerifierInput

#: Weight of the log-prob fidelity part.
W_FIDELITY = 0.5
#: Weight of the seeded-replay part.
W_REPLAY = 0.3
#: Weight of the likelihood part.
W_LIKELIHOOD = 0.2
#: Under sampling, a divergent token with a reference log-prob at least this (nats) counts as explainable.
SAMPLED_PLAUSIBLE_LOGPROB = math.log(1e-3)
#: Most characters an answer may hold per token asked for (a byte-level token decodes to a few characters).
MAX_CHARS_PER_TOKEN = 64
#: Longest a replay or teacher-forced score may take, in seconds (the reference engine is local).
REFERENCE_TIMEOUT_S = 120.0
#: The tolerance used when no calibration is given: fp32 vs fp32, before measurement (the shipped file replaces it).
FALLBACK_TOLERANCE = Tolerance(logprob_abs=1e-4, tie_gap=1e-4, source="fallback before calibration")
_ids = itertools.count()


@dataclass(frozen=True, slots=True, kw_only=True)
class Challenge:
    """One audit request as the verifier sent it (the replay reruns exactly this)."""

    #: Prompt text (private: never in reprs or logs).
    prompt: str
    #: Most tokens asked for, 1..4096.
    max_tokens: int
    #: Sampling temperature, 0..2 (0 = greedy).
    temperature: float
    #: Nucleus mass, (0, 1].
    top_p: float
    #: The request's seed, 0..2**63-1 (what makes a sampled answer replayable).
    seed: int
    #: Stop strings the request carried (at most four; the replay uses the same).
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt:
            raise InvalidVerifierInput("prompt", None, "non-empty text")
        try:
            self.params()
        except InvalidParams as exc:
            value = None if exc.param == "seed" else exc.value  # a seed is private
            raise InvalidVerifierInput(exc.param, value, exc.reason) from exc

    def params(self) -> SamplingParams:
        """The sampling parameters of the challenge (what the node was asked to use)."""
        return SamplingParams(
            max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, seed=self.seed, stop=self.stop
        )

    def __repr__(self) -> str:
        return (
            f"Challenge(prompt=<{len(self.prompt)}>, max_tokens={self.max_tokens}, temperature={self.temperature}, "
            f"top_p={self.top_p}, seed=<redacted>)"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Answer:
    """What the node returned for a challenge."""

    #: Completion text (private).
    text: str
    #: Completion token ids as the node reported them (empty: the verifier tokenizes ``text``).
    token_ids: tuple[int, ...]
    #: The node's per-token natural-log probabilities under the raw distribution, one per token (each <= 0).
    logprobs: tuple[float, ...]
    #: "stop", "length" or "abort", as the node reported it.
    finish_reason: str

    def __repr__(self) -> str:
        return f"Answer(text=<{len(self.text)}>, tokens={len(self.token_ids)}, finish_reason={self.finish_reason!r})"


@dataclass(frozen=True, slots=True, kw_only=True)
class ChallengeScore:
    """A challenge's score and the parts it is made of (the evidence a verifier stores)."""

    #: The combined score, 0..1 (1: everything the verifier can check agrees).
    score: float
    #: Log-prob fidelity of the worst token, 0..1.
    fidelity: float
    #: Replay agreement (with explained-divergence credit), 0..1.
    replay: float
    #: Likelihood relative to the reference's replay, 0..1.
    likelihood: float
    #: Whether the finish reason and length are consistent.
    finish_ok: bool
    #: Answer tokens equal to the replay's before the first divergence.
    agreed_tokens: int
    #: Index of the first divergent token, or None when the answer equals the replay.
    diverged_at: int | None
    #: Whether that divergence is explained by numerical noise.
    divergence_explained: bool
    #: Largest |reported - reference| per-token log-prob, in nats (inf when the node's log-probs are missing).
    max_logprob_error: float
    #: Mean teacher-forced log-prob of the answer minus the replay's, in nats per token.
    likelihood_delta: float
    #: Tokens in the node's answer.
    answer_tokens: int
    #: Tokens in the reference's replay.
    reference_tokens: int
    #: Why the score is 0 without comparison ("" when it was compared): e.g. "malformed".
    rejected: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON form (evidence records)."""
        return {
            "score": self.score,
            "fidelity": self.fidelity,
            "replay": self.replay,
            "likelihood": self.likelihood,
            "finish_ok": self.finish_ok,
            "agreed_tokens": self.agreed_tokens,
            "diverged_at": self.diverged_at,
            "divergence_explained": self.divergence_explained,
            "max_logprob_error": self.max_logprob_error if math.isfinite(self.max_logprob_error) else None,
            "likelihood_delta": self.likelihood_delta,
            "answer_tokens": self.answer_tokens,
            "reference_tokens": self.reference_tokens,
            "rejected": self.rejected,
        }


def _zero(reason: str, answer_tokens: int, reference_tokens: int) -> ChallengeScore:
    return ChallengeScore(
        score=0.0,
        fidelity=0.0,
        replay=0.0,
        likelihood=0.0,
        finish_ok=False,
        agreed_tokens=0,
        diverged_at=0,
        divergence_explained=False,
        max_logprob_error=math.inf,
        likelihood_delta=-math.inf,
        answer_tokens=answer_tokens,
        reference_tokens=reference_tokens,
        rejected=reason,
    )


def _malformed(challenge: Challenge, answer: Answer) -> str:
    """Why ``answer`` cannot be scored at all ("" when it can)."""
    ids, logprobs = answer.token_ids, answer.logprobs
    if not isinstance(ids, tuple) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        return "malformed"
    if not isinstance(logprobs, tuple) or not all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in logprobs
    ):
        return "malformed"
    if not isinstance(answer.text, str) or not isinstance(answer.finish_reason, str):
        return "malformed"
    if len(ids) > challenge.max_tokens or len(logprobs) > challenge.max_tokens:
        return "more tokens than max_tokens"
    if len(answer.text) > MAX_CHARS_PER_TOKEN * challenge.max_tokens:
        return "more text than max_tokens"
    return ""


def _token_fidelity(reported: float, reference: float, tol: float) -> tuple[float, float]:
    """(credit in 0..1, |error|) of one reported log-prob."""
    if not math.isfinite(reported):
        return 0.0, math.inf
    err = abs(reported - reference)
    if err <= tol:
        return 1.0, err
    return math.exp(-(err - tol) / tol), err


class Scorer:
    """Scores challenges against a reference engine serving the claimed model (see the module docstring).

    ``node_engine`` names the kind of engine the audited node declares (its calibration row with the reference's
    ``reference_engine``); both default to the torch fp32 engine, the only pair measured here. ``tolerance``
    overrides the table (what ``calibrate`` uses while measuring one); with neither, ``FALLBACK_TOLERANCE``.
    """

    def __init__(
        self,
        engine: Engine,
        calibration: Calibration | None = None,
        *,
        node_engine: str = TORCH_FP32,
        reference_engine: str = TORCH_FP32,
        tolerance: Tolerance | None = None,
    ) -> None:
        self._engine = engine
        if tolerance is not None:
            self._tol = tolerance
        elif calibration is not None:
            self._tol = calibration.tolerance(node_engine, reference_engine)
        else:
            self._tol = FALLBACK_TOLERANCE

    @property
    def tolerance(self) -> Tolerance:
        """The tolerance in use."""
        return self._tol

    async def _replay(self, challenge: Challenge) -> tuple[list[int], list[float], str]:
        request = GenerationRequest(
            request_id=f"verifier-replay-{next(_ids)}", prompt=challenge.prompt, params=challenge.params()
        )
        ids: list[int] = []
        logprobs: list[float] = []
        finish = "abort"
        async with asyncio.timeout(REFERENCE_TIMEOUT_S):
            async for chunk in self._engine.generate(request):
                ids.extend(chunk.token_ids)
                logprobs.extend(chunk.logprobs)
                if chunk.finish_reason is not None:
                    finish = chunk.finish_reason
        return ids, logprobs, finish

    async def score(self, challenge: Challenge, answer: Answer) -> ChallengeScore:
        """Replay the challenge, teacher-force the answer, and combine the parts into a score in [0, 1].

        An answer is a peer's bytes: one that cannot be an honest answer to this challenge (ids that are not
        non-negative integers, log-probs that are not numbers, more tokens or text than ``max_tokens`` allows) scores
        0 before the reference engine does any work for it.
        """
        bad = _malformed(challenge, answer)
        if bad:
            return _zero(bad, len(answer.token_ids) if isinstance(answer.token_ids, tuple) else 0, 0)
        ref_ids, ref_lp, ref_finish = await self._replay(challenge)
        ids = list(answer.token_ids)
        try:
            async with asyncio.timeout(REFERENCE_TIMEOUT_S):
                if not ids and answer.text:
                    ids = list((await self._engine.score(challenge.prompt, answer.text)).token_ids)
                if len(ids) > challenge.max_tokens:
                    return _zero("more tokens than max_tokens", len(ids), len(ref_ids))
                forced = list((await self._engine.score(challenge.prompt, ids)).logprobs) if ids else []
        except InvalidParams:
            return _zero("malformed", len(ids), len(ref_ids))
        return self._combine(challenge, answer, ids, forced, ref_ids, ref_lp, ref_finish)

    def _combine(
        self,
        challenge: Challenge,
        answer: Answer,
        ids: list[int],
        forced: list[float],
        ref_ids: list[int],
        ref_lp: list[float],
        ref_finish: str,
    ) -> ChallengeScore:
        tol = self._tol
        n_a, n_r = len(ids), len(ref_ids)
        # Fidelity, per answer token.
        credits: list[float] = []
        max_err = 0.0
        if len(answer.logprobs) != n_a:
            credits = [0.0] * n_a
            max_err = math.inf
        else:
            for reported, reference in zip(answer.logprobs, forced, strict=True):
                credit, err = _token_fidelity(float(reported), reference, tol.logprob_abs)
                credits.append(credit)
                max_err = max(max_err, err)
        # Likelihood against the replay (like with like).
        if n_a and n_r:
            delta = statistics.fmean(forced) - statistics.fmean(ref_lp)
            likelihood = min(1.0, math.exp(max(-700.0, delta / tol.likelihood_scale)))
        elif n_a == n_r:
            delta, likelihood = 0.0, 1.0
        else:
            delta, likelihood = -math.inf, 0.0
        # Replay agreement.
        agreed = 0
        while agreed < min(n_a, n_r) and ids[agreed] == ref_ids[agreed]:
            agreed += 1
        same = agreed == n_a == n_r
        diverged_at = None if same else agreed
        explained = False
        if same:
            replay = 1.0
        else:
            n = max(n_a, n_r)
            tail = 0.0
            if agreed < min(n_a, n_r):
                node_lp, own_lp = forced[agreed], ref_lp[agreed]
                if challenge.temperature == 0.0:
                    explained = own_lp - node_lp <= tol.tie_gap
                else:
                    explained = node_lp >= SAMPLED_PLAUSIBLE_LOGPROB
                if explained:
                    tail_fid = min(credits[agreed:], default=0.0)
                    tail_delta = statistics.fmean(forced[agreed:]) - statistics.fmean(ref_lp[agreed:])
                    tail_lik = min(1.0, math.exp(max(-700.0, tail_delta / tol.likelihood_scale)))
                    tail = tail_fid * tail_lik * (n_a - agreed) / (n - agreed)
            replay = (agreed + (n - agreed) * tail) / n
        fidelity = min(credits) if credits else (1.0 if n_r == 0 else 0.0)
        finish_ok = self._finish_ok(challenge, answer.finish_reason, n_a, same, ref_finish)
        combined = W_FIDELITY * fidelity + W_REPLAY * replay + W_LIKELIHOOD * likelihood
        return ChallengeScore(
            score=max(0.0, min(1.0, combined)) if finish_ok else 0.0,
            fidelity=fidelity,
            replay=replay,
            likelihood=likelihood,
            finish_ok=finish_ok,
            agreed_tokens=agreed,
            diverged_at=diverged_at,
            divergence_explained=explained,
            max_logprob_error=max_err,
            likelihood_delta=delta,
            answer_tokens=n_a,
            reference_tokens=n_r,
        )

    @staticmethod
    def _finish_ok(challenge: Challenge, finish: str, n_a: int, same: bool, ref_finish: str) -> bool:
        if finish not in ("stop", "length") or n_a > challenge.max_tokens:
            return False
        if finish == "length" and n_a != challenge.max_tokens:
            return False
        return not same or finish == ref_finish
