"""The TensorRT-LLM adapter's mapping logic. TensorRT-LLM cannot be installed here, so a minimal stand-in for the
``tensorrt_llm`` module (the adapter's direct neighbour) records what the adapter asks of it; the conformance suite
in test_inference_engine.py runs the real thing where a GPU and the package exist.
"""

from __future__ import annotations

import sys
import types
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from node.inference import (
    EngineOverloaded,
    EngineUnavailable,
    GenerationRequest,
    InvalidParams,
    ModelLoadError,
    SamplingParams,
    TensorRtLlmEngine,
    load_engine,
    resolve_kind,
)
from node.inference._modelio import load_tokenizer
from node.inference._trtllm import finish_reason, logprob_value, trt_sampling_kwargs


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


@dataclass
class _Result:
    steps: list[_Output]
    aborted: bool = False

    def __aiter__(self) -> AsyncIterator[_Output]:
        return self._gen()

    async def _gen(self) -> AsyncIterator[_Output]:
        for step in self.steps:
            if self.aborted:
                return
            yield step

    async def aresult(self) -> _Output:
        return self.steps[-1]

    def abort(self) -> None:
        self.aborted = True


@dataclass
class _FakeLLM:
    results: list[_Result]
    calls: list[tuple[Any, Any, bool]] = field(default_factory=list)
    shut: bool = False

    def generate_async(self, inputs: Any, sampling_params: Any, streaming: bool = False) -> _Result:
        self.calls.append((inputs, sampling_params, streaming))
        return self.results.pop(0)

    def shutdown(self) -> None:
        self.shut = True


class _SamplingParams:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    module = types.ModuleType("tensorrt_llm")
    module.SamplingParams = _SamplingParams  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt_llm", module)
    yield module


def test_greedy_params_map_to_top_k_one_with_logprobs() -> None:
    kwargs = trt_sampling_kwargs(SamplingParams(max_tokens=7, temperature=0, stop=("\n",), seed=3))
    assert kwargs == {
        "max_tokens": 7,
        "top_k": 1,
        "seed": 3,
        "stop": ["\n"],
        "include_stop_str_in_output": False,
        "logprobs": 1,
    }


def test_sampling_params_map_field_by_field() -> None:
    kwargs = trt_sampling_kwargs(SamplingParams(max_tokens=9, temperature=0.7, top_p=0.9, top_k=40), logprobs=False)
    assert kwargs == {"max_tokens": 9, "temperature": 0.7, "top_p": 0.9, "top_k": 40}


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


def _steps() -> list[_Output]:
    return [
        _Output([_Completion([5], "a", [{5: _Logprob(-0.1)}], None)]),
        _Output([_Completion([5, 6, 7], "abc", [{5: _Logprob(-0.1)}, {6: _Logprob(-0.2)}, {7: _Logprob(-0.3)}], None)]),
        _Output(
            [_Completion([5, 6, 7], "abc", [{5: _Logprob(-0.1)}, {6: _Logprob(-0.2)}, {7: _Logprob(-0.3)}], "stop")]
        ),
    ]


async def test_cumulative_outputs_become_delta_chunks(fake_trt: types.ModuleType, tiny_model_dir: Path) -> None:
    llm = _FakeLLM([_Result(_steps())])
    engine = TensorRtLlmEngine(llm, load_tokenizer(tiny_model_dir), info=None, max_in_flight=2)
    request = GenerationRequest(request_id="r", prompt=(1, 2, 3), params=SamplingParams(max_tokens=3, temperature=0))
    chunks = [c async for c in engine.generate(request)]
    assert [c.token_ids for c in chunks] == [(5,), (6, 7), ()]
    assert [c.text for c in chunks] == ["a", "bc", ""]
    assert [c.logprobs for c in chunks] == [(-0.1,), (-0.2, -0.3), ()]
    assert [c.finish_reason for c in chunks] == [None, None, "stop"]
    assert chunks[-1].completion_tokens == 3 and chunks[-1].prompt_tokens == 3
    inputs, sampling, streaming = llm.calls[0]
    assert inputs == [1, 2, 3] and streaming is True
    assert sampling.kwargs["top_k"] == 1 and sampling.kwargs["logprobs"] == 1
    assert engine.stats().running_requests == 0
    await engine.close()
    assert llm.shut


async def test_closing_a_stream_early_aborts_the_request(fake_trt: types.ModuleType, tiny_model_dir: Path) -> None:
    result = _Result(_steps())
    engine = TensorRtLlmEngine(_FakeLLM([result]), load_tokenizer(tiny_model_dir), info=None, max_in_flight=2)
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


async def test_score_reads_log_probs_from_context_logits(fake_trt: types.ModuleType, tiny_model_dir: Path) -> None:
    logits = torch.randn(5, 11)
    llm = _FakeLLM([_Result([_Output([], context_logits=logits)])])
    engine = TensorRtLlmEngine(llm, load_tokenizer(tiny_model_dir), info=None, max_in_flight=1)
    result = await engine.score([1, 2, 3], [4, 9])
    expected = torch.log_softmax(logits, dim=-1)
    assert result.logprobs == pytest.approx([float(expected[2, 4]), float(expected[3, 9])], abs=1e-6)
    inputs, sampling, _ = llm.calls[0]
    assert inputs == [1, 2, 3, 4, 9] and sampling.kwargs == {"max_tokens": 1, "return_context_logits": True}
