"""Measuring a calibration: honest answers from a node engine under load, checked on the reference engine.

What honest noise looks like depends on how the node computes, so it is measured the way an honest node serves: the
node engine (a separate engine instance, possibly another kind, e.g. TensorRT-LLM in bf16) answers the challenges
batched with concurrent unrelated requests (``noise_prompts``), and the reference engine, the one the verifier will
use, teacher-forces every answer. The largest per-token log-prob error sets the tolerance
(``tolerance_from_errors``), and the honest answers scored with it give the honest score distribution. To calibrate
a new pair, build the two engines and call ``calibrate`` (``bench/verification.py --calibrate --node-kind KIND`` does
it for the torch engines and writes ``verifier/calibration.json``).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from node.inference import Engine, GenerationRequest, SamplingParams
from verifier._calibration import Calibration, pair_key, tolerance_from_errors
from verifier._errors import InvalidVerifierInput
from verifier._scoring import REFERENCE_TIMEOUT_S, Answer, Challenge, Scorer

#: Most challenges (and noise requests) in flight at once while collecting answers.
MAX_CONCURRENCY = 64
#: Most challenges one calibration measures.
MAX_CALIBRATION_CHALLENGES = 20_000
#: Challenges scored concurrently on the reference engine.
_WAVE = 16
_ids = itertools.count()


async def answer_of(engine: Engine, challenge: Challenge, *, request_id: str | None = None) -> Answer:
    """Run one challenge on ``engine`` and collect its answer as a node would return it."""
    request = GenerationRequest(
        request_id=request_id or f"calib-{next(_ids)}", prompt=challenge.prompt, params=challenge.params()
    )
    ids: list[int] = []
    logprobs: list[float] = []
    texts: list[str] = []
    finish = "abort"
    async with asyncio.timeout(REFERENCE_TIMEOUT_S):
        async for chunk in engine.generate(request):
            ids.extend(chunk.token_ids)
            logprobs.extend(chunk.logprobs)
            texts.append(chunk.text)
            if chunk.finish_reason is not None:
                finish = chunk.finish_reason
    return Answer(text="".join(texts), token_ids=tuple(ids), logprobs=tuple(logprobs), finish_reason=finish)


async def _noise(engine: Engine, prompt: str, seed: int) -> None:
    params = SamplingParams(max_tokens=24, temperature=1.0, seed=seed)
    request = GenerationRequest(request_id=f"noise-{next(_ids)}", prompt=prompt, params=params)
    async with asyncio.timeout(REFERENCE_TIMEOUT_S):
        async for _ in engine.generate(request):
            pass


async def collect_answers(
    engine: Engine, challenges: Sequence[Challenge], *, noise_prompts: Sequence[str] = (), concurrency: int = 16
) -> list[Answer]:
    """Answers to ``challenges`` from ``engine``, ``concurrency`` at a time, each wave batched with as many
    concurrent noise requests (cycling through ``noise_prompts``; none when empty), in the challenges' order."""
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise InvalidVerifierInput("concurrency", concurrency, f"1..{MAX_CONCURRENCY}")
    answers: list[Answer] = []
    noise = itertools.cycle(noise_prompts) if noise_prompts else None
    for start in range(0, len(challenges), concurrency):
        wave = challenges[start : start + concurrency]
        extra = [_noise(engine, next(noise), start + i) for i in range(len(wave))] if noise else []
        results = await asyncio.gather(*(answer_of(engine, c) for c in wave), *extra)
        answers.extend(r for r in results[: len(wave)] if isinstance(r, Answer))
    return answers


async def calibrate(
    reference: Engine,
    challenges: Sequence[Challenge],
    answers: Sequence[Answer],
    *,
    node_engine: str,
    reference_engine: str,
    base: Calibration | None = None,
    conditions: Mapping[str, Any] | None = None,
    safety: float = 20.0,
) -> Calibration:
    """The calibration row of (``node_engine``, ``reference_engine``) from honest ``answers`` to ``challenges``.

    The tolerance is ``safety`` times the largest honest per-token log-prob error (``tolerance_from_errors``); the
    honest scores are the answers scored with it. Returns ``base`` (if given) with this pair's row added.
    """
    if len(challenges) != len(answers) or not challenges:
        raise InvalidVerifierInput("answers", len(answers), f"one per challenge ({len(challenges)}), at least one")
    if len(challenges) > MAX_CALIBRATION_CHALLENGES:
        raise InvalidVerifierInput("challenges", len(challenges), f"at most {MAX_CALIBRATION_CHALLENGES}")
    pairs = list(zip(challenges, answers, strict=True))
    errors: list[float] = []

    async def forced(challenge: Challenge, answer: Answer) -> list[float]:
        if not answer.token_ids:
            return []
        async with asyncio.timeout(REFERENCE_TIMEOUT_S):
            result = await reference.score(challenge.prompt, answer.token_ids)
        return [abs(a - b) for a, b in zip(answer.logprobs, result.logprobs, strict=True)]

    for start in range(0, len(pairs), _WAVE):  # waves, so the reference engine batches them
        for errs in await asyncio.gather(*(forced(c, a) for c, a in pairs[start : start + _WAVE])):
            errors.extend(errs)
    tolerance = tolerance_from_errors(
        errors, safety=safety, source=f"{len(answers)} honest answers, {node_engine} checked on {reference_engine}"
    )
    scorer = Scorer(reference, tolerance=tolerance)
    scored: list[float] = []
    for start in range(0, len(pairs), _WAVE):
        wave = pairs[start : start + _WAVE]
        scored.extend(s.score for s in await asyncio.gather(*(scorer.score(c, a) for c, a in wave)))
    scores = tuple(scored)
    if base is not None:
        return base.with_pair(node_engine, reference_engine, tolerance, scores, dict(conditions or {}))
    key = pair_key(node_engine, reference_engine)
    return Calibration(
        tolerances={key: tolerance}, honest_scores={key: scores}, conditions={key: dict(conditions or {})}
    )
