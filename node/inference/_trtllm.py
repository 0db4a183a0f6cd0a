"""A thin adapter from our ``Engine`` protocol onto the TensorRT-LLM LLM API (1.x, ``tensorrt_llm/llmapi/llm.py``).

It maps, and does nothing clever:

* ``SamplingParams`` → ``tensorrt_llm.SamplingParams`` (``tensorrt_llm/sampling_params.py``). ``top_k``, ``top_p`` and
  a seed are **always** sent: on some releases a temperature-only request decodes greedily, and unseeded sampling is
  seeded with the runtime default 0 (so every "random" request would be the same). Greedy is ``top_k=1``.
  ``logprobs=1`` with ``logprobs_mode="raw"`` asks for the sampled token's log-prob under the unmodified distribution
  (what ``score`` and the torch engine report); a release without ``logprobs_mode`` gets the request without it.
* ``generate`` → ``LLM.generate_async(token_ids, sampling_params, streaming=True)`` iterated asynchronously; each
  cumulative ``RequestOutput`` becomes a delta chunk. Streamed text that could still be the start of a stop string
  is held back (TensorRT-LLM cuts the stop string only from the final text). ``cached_tokens`` is
  ``RequestOutput.cached_tokens`` (what ``trtllm-serve`` reports as ``prompt_tokens_details.cached_tokens``).
  Exceptions from the API become ``InvalidParams`` (``ValueError``/``TypeError``: a rejected request) or
  ``InferenceError``; no output within ``chunk_timeout_s`` is ``EngineTimeout``.
* ``score`` → one request with ``return_context_logits=True`` and a **unique** ``cache_salt``: with KV block reuse on,
  a request whose prefix is reused computes (and returns) logits only for the rest, so the slice would silently
  misalign; a fresh salt makes every block of a scoring request its own. Context logits of shape ``[T, V]`` or
  ``[1, T, V]`` are accepted.
* Precision: the model runs in ``float16`` (``LLM(dtype="float16")``): most TensorRT-LLM kernels have no fp32 path,
  and fp16 keeps 3 more mantissa bits than bf16 for the log-probs a verifier compares. A verifier comparing these
  log-probs against the torch engine's fp32 ones must allow :data:`LOGPROB_TOLERANCE` per token — an estimate, not a
  measurement (see docs/inference.md: this adapter has never run on a GPU).
* The cache summary comes from TensorRT-LLM's KV-cache events (``LLM.get_kv_cache_events_async``, enabled by
  ``KvCacheConfig(event_buffer_max_size=...)``): "stored" events give each block's tokens and parent, "removed"
  events drop blocks. Blocks are configured as 16 tokens (``tokens_per_block=16``, our chunk size), and
  :class:`KvEventSummary` reconciles any other block size by re-chunking each block chain into 16-token chunks.
  Salted blocks (scoring) are never advertised.

TensorRT-LLM is imported lazily; without it, or without a CUDA GPU, construction raises ``EngineUnavailable``.

NOT RUN ON HARDWARE: no machine this project has used could install TensorRT-LLM. The mapping is tested against a
stand-in built from the real source (tests/test_inference_trtllm.py names the files and symbols it follows).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections import OrderedDict
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node.inference._errors import (
    EngineClosed,
    EngineOverloaded,
    EngineTimeout,
    EngineUnavailable,
    InferenceError,
    InvalidParams,
)
from node.inference._prefix import CHUNK_TOKENS, ROOT, chain_hash
from node.inference._types import (
    EngineStats,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    SamplingParams,
    ScoreResult,
)
from planetserve import ModelId

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from node.inference._modelio import ModelInfo
    from node.inference._torch_engine import EngineConfig

ENGINE_NAME = "tensorrt_llm"
#: The precision the adapter asks TensorRT-LLM for.
DTYPE = "float16"
#: Per-token |log-prob| difference a verifier must allow between this adapter (fp16) and the torch engine (fp32).
#: An estimate for small Llama models (fp16 rounding of logits around 1e-3 relative), NOT measured on a GPU.
LOGPROB_TOLERANCE = 0.05
#: TensorRT-LLM finish reasons → ours ("timeout" and "cancelled" both end the stream early).
_FINISH: Mapping[str, FinishReason] = {"stop": "stop", "length": "length", "cancelled": "abort", "timeout": "abort"}
#: KV-cache events buffered by TensorRT-LLM between two drains.
_EVENT_BUFFER = 4096
#: Most blocks the event summary tracks (TensorRT-LLM's pool is bounded too; this bounds our mirror of it).
_MAX_TRACKED_BLOCKS = 1 << 17


def trt_sampling_kwargs(params: SamplingParams, *, logprobs: bool = True, seed: int | None = None) -> dict[str, Any]:
    """Keyword arguments for ``tensorrt_llm.SamplingParams`` equivalent to ``params``.

    ``seed`` stands in for an unseeded request (the caller draws it fresh): TensorRT-LLM's default seed is 0.
    """
    kwargs: dict[str, Any] = {"max_tokens": params.max_tokens}
    if params.greedy:
        kwargs["top_k"] = 1
        kwargs["top_p"] = 1.0
    else:
        kwargs["temperature"] = params.temperature
        kwargs["top_k"] = params.top_k  # 0 = all tokens (the runtime's meaning of 0)
        kwargs["top_p"] = params.top_p
    chosen = params.seed if params.seed is not None else seed
    if chosen is not None:
        kwargs["seed"] = chosen
    if params.stop:
        kwargs["stop"] = list(params.stop)
        kwargs["include_stop_str_in_output"] = False
    if logprobs:
        kwargs["logprobs"] = 1
        kwargs["logprobs_mode"] = "raw"
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


def held_back(text: str, stops: Sequence[str], *, final: bool) -> str:
    """The part of streamed ``text`` safe to send: cut at a stop string, and (while streaming) without a tail that
    could still grow into one."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        return text[:cut]
    if final or not stops:
        return text
    return text[: max(0, len(text) - (max(len(s) for s in stops) - 1))]


def context_logprobs(logits: Any, prompt_len: int, completion: Sequence[int]) -> list[float]:
    """Teacher-forced log-probs of ``completion`` from the context logits of prompt + completion.

    ``logits`` is ``[T, V]`` or ``[1, T, V]`` (both shapes occur across releases); T must cover every position.
    """
    import torch

    if logits.dim() == 3:
        if logits.shape[0] != 1:
            raise InferenceError("context logits for more than one sequence")
        logits = logits[0]
    total = prompt_len + len(completion)
    if logits.dim() != 2 or logits.shape[0] != total:
        raise InferenceError(f"context logits cover {int(logits.shape[0])} positions, expected {total}")
    logp = torch.log_softmax(logits.float()[prompt_len - 1 : total - 1], dim=-1)
    target = torch.tensor(list(completion), device=logp.device)
    return [float(v) for v in logp.gather(1, target[:, None])[:, 0].cpu()]


@dataclass(slots=True)
class _BlockState:
    parent: int | None
    hashes: list[bytes]
    #: Our chain hash after the last full 16-token chunk, and the tokens after it (fewer than 16).
    chain: bytes
    rest: list[int]


class KvEventSummary:
    """Our 16-token chunk hashes for the blocks TensorRT-LLM reports as cached, from its KV-cache events.

    Each stored block extends its parent's token chain; its tokens are re-chunked into 16-token chunks so any block
    size maps onto the hashes clients compute. A chunk's hash belongs to the block where the chunk completes, so it
    disappears when that block is removed. Bounded by :data:`_MAX_TRACKED_BLOCKS` (oldest dropped first).
    """

    def __init__(self) -> None:
        self._blocks: OrderedDict[int, _BlockState] = OrderedDict()

    def apply(self, event: Mapping[str, Any]) -> None:
        """Apply one event dict (``{"event_id", "data": {"type": ...}}``); unknown types are ignored."""
        data = event.get("data")
        if not isinstance(data, Mapping):
            return
        kind = data.get("type")
        if kind == "stored":
            raw_parent = data.get("parent_hash")
            parent = None if raw_parent is None else int(raw_parent)
            for block in data.get("blocks") or []:
                parent = self._store(parent, block)
        elif kind == "removed":
            for block_hash in data.get("block_hashes") or []:
                self._blocks.pop(int(block_hash), None)

    def _store(self, parent: int | None, block: Mapping[str, Any]) -> int | None:
        block_hash = block.get("block_hash")
        if block_hash is None:
            return None
        if block.get("cache_salt") is not None:  # a scoring request's private blocks: never reusable
            return int(block_hash)
        tokens = [int(t["token_id"]) for t in block.get("tokens") or []]
        base = self._blocks.get(parent) if parent is not None else None
        if parent is not None and base is None:
            return int(block_hash)  # its parent is unknown (evicted, or from before we listened): cannot chain
        chain, rest = (base.chain, list(base.rest)) if base else (ROOT, [])
        rest.extend(tokens)
        hashes: list[bytes] = []
        while len(rest) >= CHUNK_TOKENS:
            chain = chain_hash(chain, rest[:CHUNK_TOKENS])
            hashes.append(chain)
            rest = rest[CHUNK_TOKENS:]
        key = int(block_hash)
        self._blocks[key] = _BlockState(parent=parent, hashes=hashes, chain=chain, rest=rest)
        self._blocks.move_to_end(key)
        while len(self._blocks) > _MAX_TRACKED_BLOCKS:
            self._blocks.popitem(last=False)
        return key

    def hashes(self, limit: int) -> tuple[bytes, ...]:
        """Up to ``limit`` advertised hashes, most recently stored first."""
        out: list[bytes] = []
        for state in reversed(self._blocks.values()):
            for h in reversed(state.hashes):
                out.append(h)
                if len(out) >= limit:
                    return tuple(out)
        return tuple(out)


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


def _wrap(exc: Exception) -> Exception:
    """Our error for one raised by the LLM API (a rejected request, or a failure of the runtime)."""
    if isinstance(exc, (ValueError, TypeError)):
        return InvalidParams(param="request", value=None, reason=f"rejected by tensorrt_llm ({type(exc).__name__})")
    return InferenceError(f"tensorrt_llm failed ({type(exc).__name__})")


class TensorRtLlmEngine:
    """``Engine`` over a ``tensorrt_llm.LLM``; construct with :meth:`from_folder`."""

    def __init__(
        self,
        llm: Any,
        tokenizer: PreTrainedTokenizerFast,
        *,
        info: ModelInfo | None,
        max_in_flight: int,
        chunk_timeout_s: float = 120.0,
        advertise_limit: int = 1024,
    ) -> None:
        self._llm = llm
        self._tok = tokenizer
        self._info = info
        self._max_in_flight = max_in_flight
        self._timeout = chunk_timeout_s
        self._advertise_limit = advertise_limit
        self._in_flight: dict[str, Any] = {}
        self._summary = KvEventSummary()
        self._events: asyncio.Task[None] | None = None
        self._logprobs_mode = True
        self._cancelled: set[str] = set()
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

        kv = KvCacheConfig(
            enable_block_reuse=cfg.prefix_cache_bytes > 0,
            tokens_per_block=CHUNK_TOKENS,
            event_buffer_max_size=_EVENT_BUFFER if cfg.prefix_cache_bytes > 0 else 0,
        )
        llm = trt.LLM(model=str(folder), dtype=DTYPE, kv_cache_config=kv, max_batch_size=cfg.max_running)
        return cls(
            llm,
            load_tokenizer(folder),
            info=read_info(folder),
            max_in_flight=cfg.max_queue + cfg.max_running,
            chunk_timeout_s=cfg.chunk_timeout_s,
            advertise_limit=cfg.advertise_limit,
        )

    @property
    def model_id(self) -> ModelId:
        """The served model's id, ``ModelId.ZERO`` when the folder had no metadata."""
        return self._info.model_id if self._info else ModelId.ZERO

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        """Stream via ``LLM.generate_async(..., streaming=True)``, converting cumulative outputs to deltas."""
        self._admit(request.request_id)
        result: Any = None
        finished = False
        try:
            prompt = await self._ids(request.prompt)
            if request.request_id in self._cancelled:
                finished = True
                yield GenerationChunk(
                    request_id=request.request_id,
                    token_ids=(),
                    logprobs=(),
                    text="",
                    finish_reason="abort",
                    prompt_tokens=len(prompt),
                    completion_tokens=0,
                    cached_tokens=0,
                )
                return
            self._start_events()
            seed = None if request.params.greedy else secrets.randbits(63)
            sampling = self._sampling(trt_sampling_kwargs(request.params, seed=seed))
            try:
                result = self._llm.generate_async(prompt, sampling_params=sampling, streaming=True)
            except Exception as exc:
                raise _wrap(exc) from exc
            self._in_flight[request.request_id] = result
            stops = request.params.stop
            sent_tokens, sent_text = 0, 0
            outputs = aiter(result)
            while True:
                try:
                    output = await asyncio.wait_for(anext(outputs), timeout=self._timeout)
                except StopAsyncIteration:
                    break
                except TimeoutError as exc:
                    raise EngineTimeout(seconds=self._timeout) from exc
                except InferenceError:
                    raise
                except Exception as exc:
                    raise _wrap(exc) from exc
                completion = output.outputs[0]
                ids = list(completion.token_ids)
                raw_lp = list(completion.logprobs or [])
                new_lp = [
                    logprob_value(raw_lp[i], ids[i]) if i < len(raw_lp) else float("nan")
                    for i in range(sent_tokens, len(ids))
                ]
                reason = finish_reason(completion.finish_reason)
                text = held_back(completion.text or "", stops, final=reason is not None)
                cached = getattr(output, "cached_tokens", 0)
                cached = cached if isinstance(cached, int) and not isinstance(cached, bool) else 0
                chunk = GenerationChunk(
                    request_id=request.request_id,
                    token_ids=tuple(ids[sent_tokens:]),
                    logprobs=tuple(new_lp),
                    text=text[sent_text:] if len(text) > sent_text else "",
                    finish_reason=reason,
                    prompt_tokens=len(prompt),
                    completion_tokens=len(ids),
                    cached_tokens=max(0, min(cached, len(prompt))),
                )
                sent_tokens, sent_text = len(ids), max(sent_text, len(text))
                if reason is not None:
                    finished = True
                yield chunk
                if finished:
                    return
            raise InferenceError("tensorrt_llm ended the stream without a finish reason")
        finally:
            self._in_flight.pop(request.request_id, None)
            self._cancelled.discard(request.request_id)
            if not finished and result is not None:
                with contextlib.suppress(Exception):
                    result.abort()

    async def score(self, prompt: str | Sequence[int], completion: str | Sequence[int]) -> ScoreResult:
        """Teacher-forced log-probs from the context logits of one prefill that reuses no cached block."""
        p_ids = await self._ids(prompt if isinstance(prompt, str) else tuple(prompt))
        c_ids = await self._ids(completion if isinstance(completion, str) else tuple(completion), allow_empty=True)
        if not c_ids:
            return ScoreResult(token_ids=(), logprobs=(), prompt_tokens=len(p_ids))
        rid = f"\x00score-{secrets.token_hex(8)}"
        self._admit(rid)
        try:
            sampling = self._sampling({"max_tokens": 1, "top_k": 1, "top_p": 1.0, "return_context_logits": True})
            try:
                result = self._llm.generate_async(
                    p_ids + c_ids, sampling_params=sampling, cache_salt=secrets.token_hex(16)
                )
                self._in_flight[rid] = result
                output = await asyncio.wait_for(result.aresult(), timeout=self._timeout)
            except TimeoutError as exc:
                raise EngineTimeout(seconds=self._timeout) from exc
            except Exception as exc:
                raise _wrap(exc) from exc
            if output.context_logits is None:
                raise InferenceError("tensorrt_llm returned no context logits")
            values = context_logprobs(output.context_logits, len(p_ids), c_ids)
            return ScoreResult(token_ids=tuple(c_ids), logprobs=tuple(values), prompt_tokens=len(p_ids))
        finally:
            self._in_flight.pop(rid, None)

    def stats(self) -> EngineStats:
        """In-flight requests; the cache summary mirrors TensorRT-LLM's KV-cache events."""
        return EngineStats(
            model_id=self.model_id,
            queued_requests=0,
            running_requests=len(self._in_flight),
            queued_tokens=0,
            cached_prefix_hashes=self._summary.hashes(self._advertise_limit),
            cache_bytes=0,
            prefill_tokens_computed=0,
            prefill_tokens_cached=0,
            tokens_per_second=0.0,
        )

    async def abort(self, request_id: str) -> bool:
        """``RequestOutput.abort()`` on the request, if in flight."""
        if request_id not in self._in_flight:
            return False
        result = self._in_flight[request_id]
        if result is None:  # still tokenizing: generate checks this before submitting
            self._cancelled.add(request_id)
        else:
            result.abort()
        return True

    async def check_health(self) -> bool:
        """True until closed."""
        return not self._closed

    async def close(self) -> None:
        """Abort in-flight requests, stop draining events and shut the LLM down."""
        if self._closed:
            return
        self._closed = True
        for result in list(self._in_flight.values()):
            if result is not None:
                with contextlib.suppress(Exception):
                    result.abort()
        if self._events is not None:
            self._events.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._events
        await asyncio.to_thread(self._llm.shutdown)

    # -------------------------------------------------------------------------------------------------- helpers
    def _admit(self, request_id: str) -> None:
        if self._closed:
            raise EngineClosed()
        if request_id in self._in_flight:
            raise InvalidParams(param="request_id", value=request_id, reason="already in flight")
        if len(self._in_flight) >= self._max_in_flight:
            raise EngineOverloaded(queued=len(self._in_flight), limit=self._max_in_flight)
        self._in_flight[request_id] = None

    def _sampling(self, kwargs: dict[str, Any]) -> Any:
        trt = _require_trt()
        if not self._logprobs_mode:
            kwargs.pop("logprobs_mode", None)
        try:
            return trt.SamplingParams(**kwargs)
        except TypeError:
            if "logprobs_mode" not in kwargs:
                raise
            self._logprobs_mode = False  # a release without the field: its log-probs are the raw ones
            kwargs.pop("logprobs_mode")
            return trt.SamplingParams(**kwargs)

    async def _ids(self, prompt: str | tuple[int, ...], *, allow_empty: bool = False) -> list[int]:
        if isinstance(prompt, str):
            ids = list(await asyncio.to_thread(self._tok.encode, prompt, add_special_tokens=False))
        else:
            ids = list(prompt)
        if not ids and not allow_empty:
            raise InvalidParams(param="prompt", value=0, reason="tokenizes to nothing")
        return ids

    def _start_events(self) -> None:
        """Drain KV-cache events in the background (started with the first request, inside the running loop)."""
        if self._events is None and hasattr(self._llm, "get_kv_cache_events_async"):
            self._events = asyncio.create_task(self._drain_events())

    async def _drain_events(self) -> None:
        while not self._closed:
            try:
                async for event in self._llm.get_kv_cache_events_async(timeout=1.0):
                    if isinstance(event, Mapping):
                        self._summary.apply(event)
            except asyncio.CancelledError:
                raise
            except Exception:  # the summary is advisory; a failing drain must not take serving down
                await asyncio.sleep(1.0)
                continue
            await asyncio.sleep(0.05)
