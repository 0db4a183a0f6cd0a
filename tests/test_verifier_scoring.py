"""Per-challenge scoring: honest answers from a separate, batched engine score near 1 at T=0 and T=0.8; a cheaper
model, canned and replayed answers score low; forged log-probs, impossible finish reasons and malformed tokens are
penalised; near-tie divergences are explained and others are not; the calibration table round-trips and refuses
pairs it never measured."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from node.inference import (
    EngineConfig,
    EngineStats,
    GenerationChunk,
    GenerationRequest,
    ScoreResult,
    TorchEngine,
    make_variant,
)
from node.inference.testing import CheatConfig, CheatingEngine
from planetserve import ModelId
from verifier import (
    Answer,
    Calibration,
    CalibrationFileError,
    Challenge,
    Scorer,
    Tolerance,
    UncalibratedEnginePair,
    calibrate,
    collect_answers,
)
from verifier._calibration import MAX_CALIBRATION_BYTES, TORCH_FP32, TRTLLM_BF16, tolerance_from_errors
from verifier._errors import InvalidVerifierInput

PROMPTS = (
    "\n12+07=",
    "\necho ka lo mi :",
    "\nreverse ru ten vo :",
    "\nthe color of",
    "\n31+14=",
    "\necho zi pa :",
    "\nthe old cat",
    "\n05+40=",
)
NOISE = ("\nthe friend of", "\n22+22=", "\necho dor el :", "\nreverse ba shi :")


@pytest.fixture
async def node_engine(tiny_model_dir: Path) -> AsyncIterator[TorchEngine]:
    """The honest node's engine: a separate instance from the verifier's, batching up to 8 requests."""
    engine = TorchEngine.from_folder(tiny_model_dir, EngineConfig(device="cpu", max_queue=64, max_running=8))
    try:
        yield engine
    finally:
        await engine.close()


@pytest.fixture(scope="module")
def fewer_layers_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fewer") / "m"
    make_variant(tiny_model_dir, "fewer-layers", out)
    return out


def _challenges(temperature: float, max_tokens: int = 12) -> list[Challenge]:
    return [
        Challenge(prompt=p, max_tokens=max_tokens, temperature=temperature, top_p=1.0, seed=1000 + i)
        for i, p in enumerate(PROMPTS)
    ]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
async def test_honest_answers_from_a_separate_batched_engine_score_near_one(
    torch_engine: TorchEngine, node_engine: TorchEngine, temperature: float
) -> None:
    challenges = _challenges(temperature)
    answers = await collect_answers(node_engine, challenges, noise_prompts=NOISE, concurrency=8)
    scorer = Scorer(torch_engine, Calibration.default())
    for challenge, answer in zip(challenges, answers, strict=True):
        result = await scorer.score(challenge, answer)
        assert result.score >= 0.99, result
        assert result.fidelity == 1.0 and result.diverged_at is None and result.finish_ok
        assert result.max_logprob_error <= scorer.tolerance.logprob_abs


async def test_a_fewer_layers_model_scores_far_below_honest(torch_engine: TorchEngine, fewer_layers_dir: Path) -> None:
    cheap = TorchEngine.from_folder(fewer_layers_dir, EngineConfig(device="cpu", max_running=8))
    try:
        challenges = _challenges(0.0) + _challenges(0.8)
        answers = await collect_answers(cheap, challenges, concurrency=8)
    finally:
        await cheap.close()
    scorer = Scorer(torch_engine, Calibration.default())
    scores = [await scorer.score(c, a) for c, a in zip(challenges, answers, strict=True)]
    assert max(s.score for s in scores) < 0.9
    assert sum(s.score for s in scores) / len(scores) < 0.6
    assert all(s.fidelity < 0.5 for s in scores)


async def test_canned_and_replayed_answers_score_near_zero(tiny_model_dir: Path, torch_engine: TorchEngine) -> None:
    scorer = Scorer(torch_engine, Calibration.default())
    challenges = _challenges(0.0)
    for mode in ("canned", "replay"):
        honest = TorchEngine.from_folder(tiny_model_dir, EngineConfig(device="cpu"))
        cheat = CheatingEngine(honest, CheatConfig(mode=mode), tokenize=honest.tokenize, detokenize=honest.detokenize)
        try:
            answers = await collect_answers(cheat, challenges, concurrency=1)
            cheated = [flag for _, flag in cheat.decisions]
        finally:
            await cheat.close()
        scored = [await scorer.score(c, a) for c, a in zip(challenges, answers, strict=True)]
        bad = [s.score for s, flag in zip(scored, cheated, strict=True) if flag]
        assert len(bad) >= len(challenges) - 1  # replay answers its first request honestly
        # An earlier answer can be this prompt's very tokens (the tiny model repeats itself); its log-probs, computed
        # in another context, still give it away: at most the replay and likelihood parts remain.
        assert all(s.fidelity < 0.01 for s, flag in zip(scored, cheated, strict=True) if flag)
        assert max(bad) <= 0.5 + 1e-9 and sum(bad) / len(bad) < 0.3, (mode, bad)


async def test_correct_tokens_with_forged_logprobs_lose_the_fidelity_part(
    torch_engine: TorchEngine, node_engine: TorchEngine
) -> None:
    challenge = _challenges(0.8)[1]
    (honest,) = await collect_answers(node_engine, [challenge])
    scorer = Scorer(torch_engine, Calibration.default())
    assert (await scorer.score(challenge, honest)).score >= 0.99
    shifted = replace(honest, logprobs=tuple(lp - 0.02 for lp in honest.logprobs))
    flattered = replace(honest, logprobs=tuple(0.0 for _ in honest.logprobs))
    missing = replace(honest, logprobs=())
    for forged in (shifted, flattered, missing):
        result = await scorer.score(challenge, forged)
        assert result.fidelity < 1e-6 and result.replay == 1.0
        assert result.score <= 0.5 + 1e-6


async def test_impossible_finish_reasons_and_malformed_tokens_score_zero(
    torch_engine: TorchEngine, node_engine: TorchEngine
) -> None:
    challenge = _challenges(0.0, max_tokens=6)[0]
    (honest,) = await collect_answers(node_engine, [challenge])
    scorer = Scorer(torch_engine, Calibration.default())
    assert honest.finish_reason in ("stop", "length")
    flipped = "stop" if honest.finish_reason == "length" else "length"
    cases = {
        "aborted": replace(honest, finish_reason="abort"),
        "flipped finish": replace(honest, finish_reason=flipped),
        "too long": replace(
            honest, token_ids=honest.token_ids * 3, logprobs=honest.logprobs * 3, finish_reason="length"
        ),
        "outside vocabulary": replace(honest, token_ids=(10**7,) * len(honest.token_ids)),
        "empty": replace(honest, text="", token_ids=(), logprobs=(), finish_reason="stop"),
    }
    for name, answer in cases.items():
        result = await scorer.score(challenge, answer)
        assert result.score == 0.0, name
    assert (await scorer.score(challenge, cases["outside vocabulary"])).rejected == "malformed"


class _ScriptedReference:
    """A reference engine's direct stand-in: replays a fixed answer and teacher-forces from a fixed table."""

    def __init__(self, replay: Sequence[int], replay_lp: Sequence[float], forced: dict[int, float]) -> None:
        self._replay = tuple(replay)
        self._replay_lp = tuple(replay_lp)
        self._forced = forced

    @property
    def model_id(self) -> ModelId:
        return ModelId.ZERO

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        yield GenerationChunk(
            request_id=request.request_id,
            token_ids=self._replay,
            logprobs=self._replay_lp,
            text="",
            finish_reason="length",
            prompt_tokens=1,
            completion_tokens=len(self._replay),
            cached_tokens=0,
        )

    async def score(self, prompt: str | Sequence[int], completion: str | Sequence[int]) -> ScoreResult:
        ids = tuple(int(t) for t in completion)
        return ScoreResult(token_ids=ids, logprobs=tuple(self._forced[t] for t in ids), prompt_tokens=1)

    def stats(self) -> EngineStats:
        raise NotImplementedError

    async def abort(self, request_id: str) -> bool:
        return False

    async def check_health(self) -> bool:
        return True

    async def close(self) -> None:
        return None


@pytest.mark.parametrize(("own_lp", "explained"), [(-0.69310, True), (-0.40, False)])
async def test_a_greedy_divergence_is_explained_only_at_a_near_tie(own_lp: float, explained: bool) -> None:
    # The reference's greedy token 5 has log-prob own_lp; the node chose token 6 (log-prob -0.69315) and then 7.
    forced = {1: -0.01, 5: own_lp, 6: -0.69315, 7: -0.2}
    reference = _ScriptedReference([1, 5, 7, 7], [-0.01, own_lp, -0.2, -0.2], forced)
    scorer = Scorer(reference, tolerance=Tolerance(logprob_abs=1e-4, tie_gap=1e-4))
    challenge = Challenge(prompt="x", max_tokens=4, temperature=0.0, top_p=1.0, seed=0)
    answer = Answer(text="", token_ids=(1, 6, 7, 7), logprobs=(-0.01, -0.69315, -0.2, -0.2), finish_reason="length")
    result = await scorer.score(challenge, answer)
    assert result.diverged_at == 1 and result.divergence_explained is explained
    assert result.fidelity == 1.0
    if explained:
        assert result.score >= 0.95
    else:
        assert result.replay == pytest.approx(0.25) and result.score < 0.8


def test_calibration_round_trips_and_refuses_an_unmeasured_pair(tmp_path: Path) -> None:
    tol = tolerance_from_errors([1e-6, 3e-6, 2e-6], source="test")
    assert tol.logprob_abs == pytest.approx(1e-4) and tol.measured_max_abs == pytest.approx(3e-6)
    cal = Calibration(tolerances={"a/b": tol}).with_pair(TORCH_FP32, TORCH_FP32, tol, (1.0, 0.99), {"n": 2})
    path = tmp_path / "c.json"
    cal.save(path)
    loaded = Calibration.load(path)
    assert loaded == cal
    assert loaded.honest() == (1.0, 0.99)
    with pytest.raises(UncalibratedEnginePair) as info:
        loaded.tolerance(TRTLLM_BF16, TORCH_FP32)
    assert info.value.node_engine == TRTLLM_BF16 and TORCH_FP32 + "/" + TORCH_FP32 in info.value.known
    with pytest.raises(UncalibratedEnginePair):
        Scorer(_ScriptedReference([], [], {}), loaded, node_engine=TRTLLM_BF16)


def test_calibration_files_that_are_not_calibrations_are_refused(tmp_path: Path) -> None:
    cases = {
        "missing.json": None,
        "junk.json": "{not json",
        "list.json": "[]",
        "version.json": json.dumps({"version": 99, "tolerances": {}}),
        "negative.json": json.dumps({"version": 1, "tolerances": {"a/b": {"logprob_abs": -1, "tie_gap": 1}}}),
        "huge.json": " " * (MAX_CALIBRATION_BYTES + 1),
    }
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(CalibrationFileError):
            Calibration.load(tmp_path / name)


def test_the_shipped_calibration_is_measured_fp32_with_honest_scores_well_above_half() -> None:
    cal = Calibration.default()
    tol = cal.tolerance()
    assert tol.measured_tokens > 0 and 0 < tol.measured_max_abs < tol.logprob_abs <= 1e-3
    honest = cal.honest()
    assert len(honest) >= 64 and min(honest) >= 0.9


async def test_calibrate_measures_a_tolerance_from_batched_honest_answers(
    torch_engine: TorchEngine, node_engine: TorchEngine
) -> None:
    challenges = _challenges(0.0, max_tokens=6)[:4] + _challenges(0.8, max_tokens=6)[:4]
    answers = await collect_answers(node_engine, challenges, noise_prompts=NOISE, concurrency=8)
    cal = await calibrate(torch_engine, challenges, answers, node_engine=TORCH_FP32, reference_engine=TORCH_FP32)
    tol = cal.tolerance()
    assert tol.measured_tokens == sum(len(a.token_ids) for a in answers)
    assert tol.measured_max_abs < 1e-4 <= tol.logprob_abs
    assert min(cal.honest()) >= 0.99
    with pytest.raises(InvalidVerifierInput):
        await calibrate(torch_engine, challenges, answers[:-1], node_engine=TORCH_FP32, reference_engine=TORCH_FP32)


class _UntouchableReference(_ScriptedReference):
    """A reference that fails the test if the scorer asks it for any work."""

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        raise AssertionError("the reference engine was asked to replay a malformed answer")
        yield  # pragma: no cover - makes this an async generator

    async def score(self, prompt: str | Sequence[int], completion: str | Sequence[int]) -> ScoreResult:
        raise AssertionError("the reference engine was asked to score a malformed answer")


async def test_malformed_or_oversized_answers_from_a_peer_score_zero_without_reference_work() -> None:
    scorer = Scorer(_UntouchableReference([], [], {}), tolerance=Tolerance(logprob_abs=1e-4, tie_gap=1e-4))
    challenge = Challenge(prompt="x", max_tokens=4, temperature=0.0, top_p=1.0, seed=0)
    ok = {"text": "ab", "token_ids": (1, 2), "logprobs": (-0.1, -0.2), "finish_reason": "stop"}
    junk: list[dict[str, object]] = [
        {"token_ids": (1, None)},
        {"token_ids": (1, -3)},
        {"token_ids": (True, 2)},
        {"token_ids": [1, 2]},
        {"logprobs": (-0.1, "x")},
        {"logprobs": (False, -0.2)},
        {"text": None},
        {"finish_reason": 3},
        {"token_ids": tuple(range(10_000)), "logprobs": (-0.1,) * 10_000},
        {"logprobs": (-0.1,) * 5},
        {"text": "y" * 10_000_000, "token_ids": ()},
    ]
    for change in junk:
        answer = Answer(**{**ok, **change})  # type: ignore[arg-type]
        result = await scorer.score(challenge, answer)
        assert result.score == 0.0 and result.rejected, change
