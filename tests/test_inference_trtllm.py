"""The TensorRT-LLM adapter against a stand-in of the LLM API. TensorRT-LLM cannot be installed here, so the stand-in
(the adapter's direct neighbour) follows the real source, NVIDIA/TensorRT-LLM 1.x:

* ``tensorrt_llm/sampling_params.py::SamplingParams`` — a slotted, keyword-only dataclass: an unknown keyword raises
  ``TypeError``; ``top_k``/``top_p``/``seed``/``temperature`` default to None (runtime defaults: all logits, 0, seed 0,
  1.0); ``logprobs_mode`` exists only on newer releases (``tests/unittest/llmapi`` parametrizes it "raw"/"processed").
* ``tensorrt_llm/llmapi/llm.py::LLM.generate_async(inputs, sampling_params=None, ..., streaming=False, ...,
  cache_salt=None)`` returns a ``RequestOutput`` (``tensorrt_llm/executor/result.py::GenerationResult``): async
  iterable when streaming (cumulative ``outputs``), ``aresult()``, ``abort()``, ``context_logits``, and
  ``cached_tokens`` (read by ``tensorrt_llm/serve/postprocess_handlers.py`` into
  ``prompt_tokens_details.cached_tokens``).
* With ``KvCacheConfig(enable_block_reuse=True)`` a request reusing cached blocks computes context logits only for the
  positions after them; ``cache_salt`` keys a request's blocks apart.
* ``LLM.get_kv_cache_events_async(timeout)`` yields dicts ``{"event_id", "data": {"type": "stored", "parent_hash",
  "blocks": [{"type": "stored_block", "block_hash", "tokens": [{"type": "unique_token", "token_id", ...}],
  "cache_salt"?}]}}`` and ``{"type": "removed", "block_hashes": [...]}`` (shape as in TensorRT-LLM's
  ``tests/unittest/.../test_kv_events`` and its gRPC ``kv_events`` converter tests).

The conformance suite in test_inference_engine.py runs the real thing where a GPU and the package exist.
"""

from __future__ import annotations

import asyncio
import sys
import types
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from node.inference import (
    CHUNK_TOKENS,
    EngineOverloaded,
    EngineTimeout,
    EngineUnavailable,
    GenerationRequest,
    InferenceError,
    InvalidParams,
    ModelLoadError,
    SamplingParams,
    TensorRtLlmEngine,
    chunk_hashes,
    load_engine,
    resolve_kind,
)
from node.inference._modelio import load_tokenizer
from node.inference._trtllm import (
    KvEventSummary,
    context_logprobs,
    finish_reason,
    held_back,
    logprob_value,
    trt_sampling_kwargs,
)

VOCAB = 11


@dataclass(slots=True, kw_only=True)
class _SamplingParams:
    """The fields of ``tensorrt_llm.SamplingParams`` the adapter may use, with the real defaults."""

    max_tokens: int = 32
    stop: str | list[str] | None = None
    include_stop_str_in_output: bool = False
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    temperature: float | None = None
    logprobs: int | None = None
    logprobs_mode: str = "raw"
    return_context_logits: bool = False


@dataclass(slots=True, kw_only=True)
class _OldSamplingParams:
    """A release before ``logprobs_mode``."""

    max_tokens: int = 32
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    temperature: float | None = None
    logprobs: int | None = None
    return_context_logits: bool = False


@dataclass
class _Logprob:
    logprob: float
    rank: int = 1


@dataclass
class _Completion:
    token_ids: list[int]
    text: str
    logprobs: list[Any]
    finish_reason: str | None


@dataclass
class _Output:
    outputs: list[_Completion]
    context_logits: torch.Tensor | None = None
    cached_tokens: int = 0


@dataclass
class _Result:
    steps: list[_Output]
    aborted: bool = False
    fail_at: int | None = None
    stall: bool = False

    def __aiter__(self) -> AsyncIterator[_Output]:
        return self._gen()

    async def _gen(self) -> AsyncIterator[_Output]:
        for i, step in enumerate(self.steps):
            if self.aborted:
                return
            if self.fail_at == i:
                raise RuntimeError("executor died")
            if self.stall:
                await asyncio.sleep(10)
            yield step

    async def aresult(self) -> _Output:
        return self.steps[-1]

    def abort(self) -> None:
        self.aborted = True


def _logits_for(prefix: tuple[int, ...]) -> torch.Tensor:
    """Deterministic next-token logits of a prefix (the stand-in's 'model')."""
    gen = torch.Generator().manual_seed(hash(prefix) % (2**31))
    return torch.randn(VOCAB, generator=gen)


@dataclass
class _FakeLLM:
    results: list[_Result] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    shut: bool = False
    reuse: bool = True
    reject: Exception | None = None
    three_d: bool = False
    _cached: set[tuple[str | None, tuple[int, ...]]] = field(default_factory=set)

    def generate_async(
        self,
        inputs: Any,
        sampling_params: Any = None,
        lora_request: Any = None,
        prompt_adapter_request: Any = None,
        streaming: bool = False,
        kv_cache_retention_config: Any = None,
        disaggregated_params: Any = None,
        scheduling_params: Any = None,
        cache_salt: str | None = None,
    ) -> _Result:
        self.calls.append({"inputs": inputs, "sampling": sampling_params, "streaming": streaming, "salt": cache_salt})
        if self.reject is not None:
            raise self.reject
        if sampling_params.return_context_logits:
            return _Result([self._prefill(list(inputs), cache_salt)])
        return self.results.pop(0)

    def _prefill(self, tokens: list[int], salt: str | None) -> _Output:
        """Context logits, but only after the blocks reused from an earlier request with the same salt."""
        reused = 0
        if self.reuse:
            while (reused + 1) * CHUNK_TOKENS < len(tokens) and (
                salt,
                tuple(tokens[: (reused + 1) * CHUNK_TOKENS]),
            ) in self._cached:
                reused += 1
            for n in range(1, len(tokens) // CHUNK_TOKENS + 1):
                self._cached.add((salt, tuple(tokens[: n * CHUNK_TOKENS])))
        start = reused * CHUNK_TOKENS
        logits = torch.stack([_logits_for(tuple(tokens[: i + 1])) for i in range(start, len(tokens))])
        return _Output([], context_logits=logits[None] if self.three_d else logits, cached_tokens=start)

    async def get_kv_cache_events_async(self, timeout: float | None = 2) -> AsyncIterator[dict[str, Any]]:
        while self.events:
            yield self.events.pop(0)

    def shutdown(self) -> None:
        self.shut = True


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    module = types.ModuleType("tensorrt_llm")
    module.SamplingParams = _SamplingParams  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt_llm", module)
    yield module


def _engine(llm: _FakeLLM, tiny_model_dir: Path, **kwargs: Any) -> TensorRtLlmEngine:
    return TensorRtLlmEngine(llm, load_tokenizer(tiny_model_dir), info=None, max_in_flight=2, **kwargs)


# ------------------------------------------------------------------------------------------------ pure mappings
def test_greedy_maps_to_top_k_one_with_raw_logprobs() -> None:
    kwargs = trt_sampling_kwargs(SamplingParams(max_tokens=7, temperature=0, stop=("\n",), seed=3))
    assert kwargs == {
        "max_tokens": 7,
        "top_k": 1,
        "top_p": 1.0,
        "seed": 3,
        "stop": ["\n"],
        "include_stop_str_in_output": False,
        "logprobs": 1,
        "logprobs_mode": "raw",
    }


def test_sampling_always_sends_top_k_top_p_and_a_seed() -> None:
    kwargs = trt_sampling_kwargs(SamplingParams(max_tokens=9, temperature=0.7), logprobs=False, seed=12345)
    assert kwargs == {"max_tokens": 9, "temperature": 0.7, "top_k": 0, "top_p": 1.0, "seed": 12345}
    given = trt_sampling_kwargs(SamplingParams(temperature=0.7, top_p=0.9, top_k=40, seed=5), seed=999)
    assert given["seed"] == 5 and given["top_k"] == 40 and given["top_p"] == 0.9


def test_logprob_entries_in_both_documented_shapes_are_read() -> None:
    assert logprob_value(-0.5, 3) == -0.5
    assert logprob_value({3: _Logprob(-0.25), 4: _Logprob(-2.0)}, 3) == -0.25
    assert logprob_value({4: _Logprob(-2.0)}, 3) != logprob_value({4: _Logprob(-2.0)}, 3)  # NaN when absent
    with pytest.raises(TypeError):
        logprob_value("bad", 1)


def test_finish_reasons_map_onto_ours() -> None:
    assert [finish_reason(x) for x in (None, "stop", "length", "cancelled", "timeout")] == [
        None,
        "stop",
        "length",
        "abort",
        "abort",
    ]


def test_partial_stop_strings_are_held_back_until_they_resolve() -> None:
    assert held_back("abc\n", ["\n\n"], final=False) == "abc"
    assert held_back("abc\nd", ["\n\n"], final=False) == "abc\n"
    assert held_back("abc\n\nzz", ["\n\n"], final=False) == "abc"
    assert held_back("abc\n", ["\n\n"], final=True) == "abc\n"
    assert held_back("abc", [], final=False) == "abc"


def test_context_logits_in_both_shapes_give_the_same_log_probs() -> None:
    logits = torch.randn(5, VOCAB)
    flat = context_logprobs(logits, 3, [4, 9])
    assert flat == context_logprobs(logits[None], 3, [4, 9])
    expected = torch.log_softmax(logits, dim=-1)
    assert flat == pytest.approx([float(expected[2, 4]), float(expected[3, 9])], abs=1e-6)
    with pytest.raises(InferenceError, match="positions"):
        context_logprobs(logits[2:], 3, [4, 9])  # logits for fewer positions: reused blocks, never sliced silently


def _stored(parent: int | None, blocks: list[tuple[int, list[int]]], salt: str | None = None) -> dict[str, Any]:
    return {
        "event_id": 1,
        "data": {
            "type": "stored",
            "parent_hash": parent,
            "blocks": [
                {
                    "type": "stored_block",
                    "block_hash": h,
                    "tokens": [{"type": "unique_token", "token_id": t, "token_extra_id": 0} for t in tokens],
                    **({"cache_salt": salt} if salt else {}),
                }
                for h, tokens in blocks
            ],
        },
    }


@pytest.mark.parametrize("block_tokens", [8, 16, 32])
def test_kv_events_give_our_chunk_hashes_whatever_the_block_size(block_tokens: int) -> None:
    tokens = list(range(100, 100 + 96))
    blocks = [(1000 + i, tokens[i : i + block_tokens]) for i in range(0, len(tokens), block_tokens)]
    summary = KvEventSummary()
    summary.apply(_stored(None, blocks[:2]))
    for i in range(2, len(blocks)):  # later blocks arrive in their own events, chained by parent
        summary.apply(_stored(blocks[i - 1][0], [blocks[i]]))
    assert set(summary.hashes(100)) == set(chunk_hashes(tokens))
    last = blocks[-1][0]
    summary.apply({"event_id": 2, "data": {"type": "removed", "block_hashes": [last]}})
    kept = (len(tokens) - block_tokens) // CHUNK_TOKENS
    assert set(summary.hashes(100)) == set(chunk_hashes(tokens)[:kept])
    assert len(summary.hashes(2)) == 2


def test_salted_blocks_and_orphans_are_not_advertised() -> None:
    summary = KvEventSummary()
    summary.apply(_stored(None, [(1, list(range(16)))], salt="score-1"))
    summary.apply(_stored(77, [(2, list(range(16)))]))  # parent never seen
    summary.apply({"event_id": 3, "data": {"type": "created", "num_blocks_per_cache_level": [1, 0]}})
    assert summary.hashes(10) == ()


# ------------------------------------------------------------------------------------------ construction errors
def test_missing_package_raises_engine_unavailable(monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)
    with pytest.raises(EngineUnavailable) as info:
        load_engine("tensorrt_llm", tiny_model_dir)
    assert info.value.engine == "tensorrt_llm" and "not installed" in info.value.reason
    assert info.value.code.startswith("model")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_no_gpu_raises_engine_unavailable(fake_trt: types.ModuleType, tiny_model_dir: Path) -> None:
    with pytest.raises(EngineUnavailable, match="no CUDA GPU"):
        TensorRtLlmEngine.from_folder(tiny_model_dir)


def test_missing_folder_is_a_model_load_error_before_any_import(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError):
        TensorRtLlmEngine.from_folder(tmp_path / "absent")


def test_auto_resolves_to_torch_without_tensorrt_and_unknown_kinds_are_rejected() -> None:
    if "tensorrt_llm" not in sys.modules:
        assert resolve_kind("auto") == "torch"
    with pytest.raises(InvalidParams) as info:
        resolve_kind("vllm")
    assert info.value.param == "engine"


# ---------------------------------------------------------------------------------------------------- streaming
def _steps(reason: str = "stop") -> list[_Output]:
    lp = [{5: _Logprob(-0.1)}, {6: _Logprob(-0.2)}, {7: _Logprob(-0.3)}]
    return [
        _Output([_Completion([5], "a", lp[:1], None)], cached_tokens=16),
        _Output([_Completion([5, 6, 7], "abc", lp, None)], cached_tokens=16),
        _Output([_Completion([5, 6, 7], "abc", lp, reason)], cached_tokens=16),
    ]


async def test_cumulative_outputs_become_delta_chunks(fake_trt: types.ModuleType, tiny_model_dir: Path) -> None:
    llm = _FakeLLM([_Result(_steps())])
    engine = _engine(llm, tiny_model_dir)
    request = GenerationRequest(request_id="r", prompt=tuple(range(1, 20)), params=SamplingParams(temperature=0))
    chunks = [c async for c in engine.generate(request)]
    assert [c.token_ids for c in chunks] == [(5,), (6, 7), ()]
    assert [c.text for c in chunks] == ["a", "bc", ""]
    assert [c.logprobs for c in chunks] == [(-0.1,), (-0.2, -0.3), ()]
    assert [c.finish_reason for c in chunks] == [None, None, "stop"]
    assert chunks[-1].completion_tokens == 3 and chunks[-1].prompt_tokens == 19
    assert all(c.cached_tokens == 16 for c in chunks), "cached_tokens comes from the result"
    call = llm.calls[0]
    assert call["inputs"] == list(range(1, 20)) and call["streaming"] is True
    assert call["sampling"].top_k == 1 and call["sampling"].logprobs == 1 and call["sampling"].logprobs_mode == "raw"
    assert engine.stats().running_requests == 0
    await engine.close()
    assert llm.shut


async def test_unseeded_sampling_gets_a_fresh_seed_per_request(
    fake_trt: types.ModuleType, tiny_model_dir: Path
) -> None:
    llm = _FakeLLM([_Result(_steps()), _Result(_steps())])
    engine = _engine(llm, tiny_model_dir)
    for rid in ("a", "b"):
        request = GenerationRequest(request_id=rid, prompt=(1, 2), params=SamplingParams(temperature=0.8))
        [c async for c in engine.generate(request)]
    seeds = [call["sampling"].seed for call in llm.calls]
    assert all(isinstance(s, int) for s in seeds) and seeds[0] != seeds[1]
    assert all(call["sampling"].top_k == 0 and call["sampling"].top_p == 1.0 for call in llm.calls)


async def test_a_release_without_logprobs_mode_still_gets_the_request(
    fake_trt: types.ModuleType, tiny_model_dir: Path
) -> None:
    fake_trt.SamplingParams = _OldSamplingParams  # type: ignore[attr-defined]
    llm = _FakeLLM([_Result(_steps("length"))])
    engine = _engine(llm, tiny_model_dir)
    request = GenerationRequest(request_id="r", prompt=(1, 2), params=SamplingParams(temperature=0.5, seed=1))
    chunks = [c async for c in engine.generate(request)]
    assert chunks[-1].finish_reason == "length"
    assert isinstance(llm.calls[0]["sampling"], _OldSamplingParams)


async def test_streamed_text_never_contains_part_of_a_stop_string(
    fake_trt: types.ModuleType, tiny_model_dir: Path
) -> None:
    steps = [
        _Output([_Completion([5], "ab\n", [-0.1], None)]),
        _Output([_Completion([5, 6], "ab\nc", [-0.1, -0.2], None)]),
        _Output([_Completion([5, 6, 7], "ab\nc\n", [-0.1, -0.2, -0.3], None)]),
        _Output([_Completion([5, 6, 7, 8], "ab\nc", [-0.1, -0.2, -0.3, -0.4], "stop")]),  # final text: stop cut
    ]
    engine = _engine(_FakeLLM([_Result(steps)]), tiny_model_dir)
    request = GenerationRequest(request_id="r", prompt=(1,), params=SamplingParams(stop=("\n\n",)))
    chunks = [c async for c in engine.generate(request)]
    sent = ""
    for chunk in chunks:
        sent += chunk.text
        assert "ab\nc".startswith(sent), "sent text that the stop string later cut"
    assert sent == "ab\nc"
    assert [c.text for c in chunks] == ["ab", "\n", "c", ""]


async def test_closing_a_stream_early_aborts_the_request(fake_trt: types.ModuleType, tiny_model_dir: Path) -> None:
    result = _Result(_steps())
    engine = _engine(_FakeLLM([result]), tiny_model_dir)
    stream = engine.generate(GenerationRequest(request_id="r", prompt=(1, 2)))
    await anext(stream)
    await stream.aclose()
    assert result.aborted


async def test_in_flight_bound_raises_engine_overloaded(fake_trt: types.ModuleType, tiny_model_dir: Path) -> None:
    engine = TensorRtLlmEngine(
        _FakeLLM([_Result(_steps())]), load_tokenizer(tiny_model_dir), info=None, max_in_flight=1
    )
    first = engine.generate(GenerationRequest(request_id="a", prompt=(1,)))
    await anext(first)
    with pytest.raises(EngineOverloaded):
        await anext(engine.generate(GenerationRequest(request_id="b", prompt=(1,))))
    await first.aclose()


async def test_api_errors_map_onto_the_engine_error_tree(fake_trt: types.ModuleType, tiny_model_dir: Path) -> None:
    rejected = _engine(_FakeLLM(reject=ValueError("prompt too long")), tiny_model_dir)
    with pytest.raises(InvalidParams) as info:
        await anext(rejected.generate(GenerationRequest(request_id="a", prompt=(1,))))
    assert "too long" not in str(info.value)
    dying = _engine(_FakeLLM([_Result(_steps(), fail_at=1)]), tiny_model_dir)
    with pytest.raises(InferenceError, match="RuntimeError"):
        [c async for c in dying.generate(GenerationRequest(request_id="b", prompt=(1,)))]
    assert dying.stats().running_requests == 0
    stalled = _engine(_FakeLLM([_Result(_steps(), stall=True)]), tiny_model_dir, chunk_timeout_s=0.05)
    with pytest.raises(EngineTimeout):
        [c async for c in stalled.generate(GenerationRequest(request_id="c", prompt=(1,)))]


# -------------------------------------------------------------------------------------------------------- score
@pytest.mark.parametrize("three_d", [False, True])
async def test_score_uses_a_fresh_cache_salt_so_reused_blocks_never_misalign_logits(
    fake_trt: types.ModuleType, tiny_model_dir: Path, three_d: bool
) -> None:
    llm = _FakeLLM(three_d=three_d)
    engine = _engine(llm, tiny_model_dir)
    prompt = list(range(1, 40))
    completion = [4, 9, 2]
    first = await engine.score(prompt, completion)
    again = await engine.score(prompt, completion)  # every prompt block is cached in the stand-in by now
    tokens = prompt + completion
    expected = [
        float(torch.log_softmax(_logits_for(tuple(tokens[:i])), dim=-1)[tokens[i]])
        for i in range(len(prompt), len(tokens))
    ]
    assert first.logprobs == pytest.approx(expected, abs=1e-6)
    assert again.logprobs == pytest.approx(expected, abs=1e-6)
    salts = [call["salt"] for call in llm.calls]
    assert all(salts) and len(set(salts)) == 2
    assert all(call["sampling"].return_context_logits for call in llm.calls)


async def test_stats_advertise_what_kv_events_report(fake_trt: types.ModuleType, tiny_model_dir: Path) -> None:
    tokens = list(range(1, 33))
    llm = _FakeLLM([_Result(_steps())], events=[_stored(None, [(11, tokens[:16]), (12, tokens[16:])])])
    engine = _engine(llm, tiny_model_dir)
    [c async for c in engine.generate(GenerationRequest(request_id="r", prompt=tuple(tokens)))]
    for _ in range(100):
        if engine.stats().cached_prefix_hashes:
            break
        await asyncio.sleep(0.01)
    assert set(engine.stats().cached_prefix_hashes) == set(chunk_hashes(tokens))
    await engine.close()
