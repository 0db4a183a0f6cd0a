"""A thin adapter from our ``Engine`` protocol onto the TensorRT-LLM LLM API.

It maps, and does nothing clever: ``SamplingParams`` → ``tensorrt_llm.SamplingParams``; ``generate`` →
``LLM.generate_async(token_ids, sampling_params, streaming=True)`` iterated asynchronously, turning each cumulative
``RequestOutput`` into a delta chunk; ``abort`` → ``RequestOutput.abort()``; ``score`` → one request with
``return_context_logits=True`` whose context logits give the teacher-forced log-probs; KV reuse →
``KvCacheConfig(enable_block_reuse=True)``. TensorRT-LLM is imported lazily; without it, or without a CUDA GPU,
construction raises ``EngineUnavailable``.

NOT RUN ON HARDWARE: no machine this project has used could install TensorRT-LLM. The mapping helpers are unit-tested
against the documented API; the adapter as a whole is untested (see docs/inference.md).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import AsyncGenerator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node.inference._errors import EngineClosed, EngineOverloaded, EngineUnavailable, InvalidParams
from node.inference._prefix import chunk_hashes
from node.inference._types import (
    EngineStats,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    SamplingParams,
    ScoreResult,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from node.inference._modelio import ModelInfo
    from node.inference._torch_engine import EngineConfig

ENGINE_NAME = "tensorrt_llm"
#: TensorRT-LLM finish reasons → ours ("timeout" and "cancelled" both end the stream early).
_FINISH: Mapping[str, FinishReason] = {"stop": "stop", "length": "length", "cancelled": "abort", "timeout": "abort"}
#: Prompt chunk hashes remembered for the heartbeat summary (TensorRT-LLM does not expose its block table).
_HASH_MEMORY = 4096


def trt_sampling_kwargs(params: SamplingParams, *, logprobs: bool = True) -> dict[str, Any]:
    """Keyword arguments for ``tensorrt_llm.SamplingParams`` equivalent to ``params``.

    Greedy decoding is expressed as ``top_k=1`` (TensorRT-LLM treats all-None sampling fields as greedy too, but
    ``top_k=1`` is unambiguous across versions). ``logprobs=1`` asks for the sampled token's log-prob.
    """
    kwargs: dict[str, Any] = {"max_tokens": params.max_tokens}
    if params.greedy:
        kwargs["top_k"] = 1
    else:
        kwargs["temperature"] = params.temperature
        if params.top_p < 1.0:
            kwargs["top_p"] = params.top_p
        if params.top_k > 0:
            kwargs["top_k"] = params.top_k
    if params.seed is not None:
        kwargs["seed"] = params.seed
    if params.stop:
        kwargs["stop"] = list(params.stop)
        kwargs["include_stop_str_in_output"] = False
    if logprobs:
        kwargs["logprobs"] = 1
    return kwargs


def logprob_value(entry: object, token: int) -> float:
    """The sampled token's log-prob from one position of ``CompletionOutput.logprobs``.

    TensorRT-LLM gives either a plain float per position or a ``{token_id: Logprob(logprob=..., rank=...)}`` dict.
    """
    if isinstance(entry, (int, float)):
        return float(entry)
    if isinstance(entry, Mapping):
        item = entry.get(token)
        if item is None:
            return float("nan")
        value = getattr(item, "logprob", item)
        if not isinstance(value, (int, float)):
            raise TypeError(f"unexpected logprob value {type(value).__name__}")
        return float(value)
    raise TypeError(f"unexpected logprob entry {type(entry).__name__}")


def finish_reason(value: object) -> FinishReason | None:
    """Our finish reason for TensorRT-LLM's (None while streaming)."""
    if value is None:
        return None
    return _FINISH.get(str(value), "stop")


def _require_trt() -> Any:
    try:
        import tensorrt_llm
    except ImportError as exc:
        raise EngineUnavailable(engine=ENGINE_NAME, reason="the tensorrt_llm package is not installed") from exc
    except Exception as exc:  # the package fails at import time without CUDA libraries
        raise EngineUnavailable(
            engine=ENGINE_NAME, reason=f"tensorrt_llm failed to import ({type(exc).__name__})"
        ) from exc
    return tensorrt_llm


def _require_gpu() -> None:
    try:
        import torch
    except ImportError as exc:
        raise EngineUnavailable(engine=ENGINE_NAME, reason="torch is not installed") from exc
    if not torch.cuda.is_available():
        raise EngineUnavailable(engine=ENGINE_NAME, reason="no CUDA GPU is available")


class TensorRtLlmEngine:
    """``Engine`` over a ``tensorrt_llm.LLM``; construct with :meth:`from_folder`."""

    def __init__(
        self,
        llm: Any,
        tokenizer: PreTrainedTokenizerFast,
        *,
        info: ModelInfo | None,
        max_in_flight: int,
    ) -> None:
        self._llm = llm
        self._tok = tokenizer
        self._info = info
        self._max_in_flight = max_in_flight
        self._in_flight: dict[str, Any] = {}
        self._prompt_tokens: dict[str, int] = {}
        self._hashes: OrderedDict[bytes, None] = OrderedDict()
        self._closed = False

    @classmethod
    def from_folder(cls, path: str | Path, config: EngineConfig | None = None) -> TensorRtLlmEngine:
        """Start TensorRT-LLM on a model folder; ``EngineUnavailable`` without the package or a GPU."""
        from node.inference._modelio import check_folder, load_tokenizer, read_info
        from node.inference._torch_engine import EngineConfig

        cfg = config or EngineConfig()
        folder = Path(path)
        check_folder(folder)
        trt = _require_trt()
        _require_gpu()
        from tensorrt_llm.llmapi import KvCacheConfig

        kv = KvCacheConfig(enable_block_reuse=cfg.prefix_cache_bytes > 0)
        llm = trt.LLM(model=str(folder), kv_cache_config=kv, max_batch_size=cfg.max_running)
        return cls(llm, load_tokenizer(folder), info=read_info(folder), max_in_flight=cfg.max_queue + cfg.max_running)

    @property
    def model_id(self) -> str:
        """The served model's id ("" without metadata)."""
        return self._info.model_id if self._info else ""

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        """Stream via ``LLM.generate_async(..., streaming=True)``, converting cumulative outputs to deltas."""
        if self._closed:
            raise EngineClosed()
        if request.request_id in self._in_flight:
            raise InvalidParams(param="request_id", value=request.request_id, reason="already in flight")
        if len(self._in_flight) >= self._max_in_flight:
            raise EngineOverloaded(queued=len(self._in_flight), limit=self._max_in_flight)
        prompt = self._ids(request.prompt)
        self._remember(prompt)
        trt = _require_trt()
        sampling = trt.SamplingParams(**trt_sampling_kwargs(request.params))
        result = self._llm.generate_async(prompt, sampling_params=sampling, streaming=True)
        self._in_flight[request.request_id] = result
        sent_tokens, sent_text = 0, 0
        finished = False
        try:
            async for output in result:
                completion = output.outputs[0]
                ids = list(completion.token_ids)
                new_ids = ids[sent_tokens:]
                raw_lp = list(completion.logprobs or [])
                new_lp = [
                    logprob_value(raw_lp[i], ids[i]) if i < len(raw_lp) else float("nan")
                    for i in range(sent_tokens, len(ids))
                ]
                text = completion.text or ""
                reason = finish_reason(completion.finish_reason)
                chunk = GenerationChunk(
                    request_id=request.request_id,
                    token_ids=tuple(new_ids),
                    logprobs=tuple(new_lp),
                    text=text[sent_text:],
                    finish_reason=reason,
                    prompt_tokens=len(prompt),
                    completion_tokens=len(ids),
                    cached_tokens=0,  # TensorRT-LLM reuses blocks but does not report the count per request
                )
                sent_tokens, sent_text = len(ids), len(text)
                if reason is not None:
                    finished = True
                yield chunk
                if finished:
                    return
        finally:
            self._in_flight.pop(request.request_id, None)
            if not finished:
                with contextlib.suppress(Exception):
                    result.abort()

    async def score(self, prompt: str | Sequence[int], completion: str | Sequence[int]) -> ScoreResult:
        """Teacher-forced log-probs from the context logits of one prefill."""
        import torch

        p_ids = self._ids(prompt if isinstance(prompt, str) else tuple(prompt))
        c_ids = self._ids(completion if isinstance(completion, str) else tuple(completion))
        trt = _require_trt()
        sampling = trt.SamplingParams(max_tokens=1, return_context_logits=True)
        result = self._llm.generate_async(p_ids + c_ids, sampling_params=sampling)
        output = await result.aresult()
        logits = output.context_logits.float()
        logp = torch.log_softmax(logits[len(p_ids) - 1 : -1], dim=-1)
        values = logp.gather(1, torch.tensor(c_ids, device=logp.device)[:, None])[:, 0].cpu().tolist()
        return ScoreResult(token_ids=tuple(c_ids), logprobs=tuple(float(v) for v in values), prompt_tokens=len(p_ids))

    def stats(self) -> EngineStats:
        """In-flight requests; cached hashes approximate TensorRT-LLM's reusable blocks by recent prompts."""
        return EngineStats(
            model_id=self.model_id,
            queued_requests=0,
            running_requests=len(self._in_flight),
            queued_tokens=0,
            cached_prefix_hashes=tuple(reversed(self._hashes)),
            cache_bytes=0,
            prefill_tokens_computed=0,
            prefill_tokens_cached=0,
            tokens_per_second=0.0,
        )

    async def abort(self, request_id: str) -> bool:
        """``RequestOutput.abort()`` on the request, if in flight."""
        result = self._in_flight.get(request_id)
        if result is None:
            return False
        result.abort()
        return True

    async def check_health(self) -> bool:
        """True until closed."""
        return not self._closed

    async def close(self) -> None:
        """Abort in-flight requests and shut the LLM down."""
        if self._closed:
            return
        self._closed = True
        for result in list(self._in_flight.values()):
            with contextlib.suppress(Exception):
                result.abort()
        await asyncio.to_thread(self._llm.shutdown)

    def _ids(self, prompt: str | tuple[int, ...]) -> list[int]:
        if isinstance(prompt, str):
            return list(self._tok.encode(prompt, add_special_tokens=False))
        return list(prompt)

    def _remember(self, prompt: list[int]) -> None:
        for h in chunk_hashes(prompt):
            self._hashes[h] = None
            self._hashes.move_to_end(h)
        while len(self._hashes) > _HASH_MEMORY:
            self._hashes.popitem(last=False)
