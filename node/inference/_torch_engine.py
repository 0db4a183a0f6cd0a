"""The ``torch`` engine: transformers on CPU or CUDA, a token-budget scheduler and a block-level shared KV cache.

Design (see docs/inference.md; the shapes follow vLLM's scheduler/block manager and SGLang's radix cache):

* One worker thread owns the model and runs every forward pass, for ``generate`` and ``score`` alike. The event loop
  tokenizes in a worker thread (``asyncio.to_thread``), enqueues, and relays chunks; detokenization is incremental and
  happens on the engine's thread.
* KV memory is a :class:`BlockPool` of 16-token blocks (the chunks the node advertises). A full block gets its chained
  hash and is stored once, shared by every sequence that has that prefix; unused cached blocks leave LRU from the
  leaves; a block in use is never evicted.
* Each scheduler step has a token budget (``max_batch_tokens``): every decoding sequence gets one token, the rest of
  the budget goes to prefill *chunks* (of requests already prefilling, then of newly admitted ones). So a burst of
  long prompts no longer stalls running streams or a short prompt behind them. Decodes run as ONE batched forward
  (per-sequence KV gathered from the blocks, padded and masked, explicit positions); each prefill chunk is one
  forward over that sequence's gathered prefix.
* Admission is by KV blocks: a request is admitted only when the pool can hold its whole prompt plus ``max_tokens``
  (minus the blocks it shares from the cache), so a running request never runs out of blocks and nothing is ever
  preempted. Waiting requests with the longest cached prefix go first (so requests sharing a prefix run together),
  except that one waiting longer than ``_FAIRNESS_S`` goes first regardless.
* Back-pressure: at most ``max_queue`` requests (``generate`` and ``score``) wait; beyond that ``EngineOverloaded``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import random
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from node.inference._errors import (
    EngineClosed,
    EngineOverloaded,
    EngineTimeout,
    InferenceError,
    InvalidParams,
)
from node.inference._kvcache import BlockPool
from node.inference._prefill_fit import PrefillFit
from node.inference._prefix import CHUNK_TOKENS, ROOT, chain_hash, chunk_hashes
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
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

    from node.inference._modelio import ModelInfo

#: A waiting request older than this (seconds) is admitted before any request with a longer cached prefix.
_FAIRNESS_S = 1.0
#: Weight of the newest step in the per-decode-token time the engine reports (about the last 10 steps count).
_DECODE_EWMA = 0.1


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineConfig:
    """Knobs shared by the engines (the TensorRT-LLM adapter uses the queue bounds and the cache switch)."""

    #: "cpu", "cuda", "cuda:N" or "auto" (CUDA when available).
    device: str = "auto"
    #: Requests allowed to wait for admission before ``EngineOverloaded``, >= 1.
    max_queue: int = 64
    #: Sequences decoded concurrently, >= 1.
    max_running: int = 8
    #: Bytes of cached prefix KV kept for reuse (blocks with a hash); 0 disables prefix reuse.
    prefix_cache_bytes: int = 256 * 1024 * 1024
    #: Bytes of the KV block pool holding every running sequence and the prefix cache, >= one block per request.
    kv_cache_bytes: int = 256 * 1024 * 1024
    #: Tokens one scheduler step may compute (decodes + prefill chunks), >= 16.
    max_batch_tokens: int = 512
    #: Most chunk hashes ``stats`` advertises.
    advertise_limit: int = 1024
    #: Longest wait for the next chunk of a stream (or a score) before ``EngineTimeout``, seconds.
    chunk_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.max_queue < 1:
            raise InvalidParams(param="max_queue", value=self.max_queue, reason="must be >= 1")
        if self.max_running < 1:
            raise InvalidParams(param="max_running", value=self.max_running, reason="must be >= 1")
        if self.prefix_cache_bytes < 0:
            raise InvalidParams(param="prefix_cache_bytes", value=self.prefix_cache_bytes, reason="must be >= 0")
        if self.kv_cache_bytes < 1:
            raise InvalidParams(param="kv_cache_bytes", value=self.kv_cache_bytes, reason="must be >= 1")
        if self.max_batch_tokens < CHUNK_TOKENS:
            raise InvalidParams(param="max_batch_tokens", value=self.max_batch_tokens, reason="must be >= 16")
        if self.chunk_timeout_s <= 0:
            raise InvalidParams(param="chunk_timeout_s", value=self.chunk_timeout_s, reason="must be > 0")


_Emit = Callable[[GenerationChunk | ScoreResult | BaseException], None]


@dataclass(slots=True, eq=False)
class _Seq:
    """A request's state; touched only by the worker thread once admitted."""

    request_id: str
    kind: Literal["generate", "score"]
    prompt_ids: list[int]
    prompt_hashes: list[bytes]
    params: SamplingParams
    emit: _Emit
    #: Score: completion tokens are ``tokens[score_from:]``; generate: ``len(prompt_ids)``.
    score_from: int
    #: Prompt then generated tokens (score: prompt then completion).
    tokens: list[int]
    #: Most tokens this sequence can ever hold (sizes its block reservation).
    max_total: int
    arrival: float = field(default_factory=time.monotonic)
    generated: list[int] = field(default_factory=list)
    table: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)
    computed: int = 0
    reserved: int = 0
    admitted: bool = False
    next_logits: Any = None
    generator: Any = None
    cached_tokens: int = 0
    score_logprobs: list[float] = field(default_factory=list)
    # Incremental detokenization (vLLM's prefix/read offsets): text so far, and how much of it was sent.
    text: str = ""
    text_sent: int = 0
    prefix_offset: int = 0
    read_offset: int = 0
    aborted: bool = False

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.tokens) - (1 if self.kind == "generate" and self.generated else 0)


@dataclass(slots=True, eq=False)
class _Batch:
    """The gathered KV of the last batched decode step, reused while the same sequences keep decoding."""

    seqs: list[_Seq]
    cache: Any
    mask: Any


class TorchEngine:
    """Serves one model folder with transformers; see the module docstring for the design."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerFast,
        *,
        info: ModelInfo | None = None,
        config: EngineConfig | None = None,
    ) -> None:
        self._model = model
        self._tok = tokenizer
        self._info = info
        self._config = config or EngineConfig()
        self._device = next(model.parameters()).device
        self._max_context = int(getattr(model.config, "max_position_embeddings", 2048))
        self._vocab = int(model.config.vocab_size)
        self._eos = tokenizer.eos_token_id
        layers, kv_heads, head_dim, dtype = self._kv_shape()
        elem = dtype.itemsize
        block_bytes = 2 * layers * kv_heads * CHUNK_TOKENS * head_dim * elem
        num_blocks = max(1, self._config.kv_cache_bytes // block_bytes)
        self._pool = BlockPool(
            num_blocks, CHUNK_TOKENS, max_cached=min(num_blocks, self._config.prefix_cache_bytes // block_bytes)
        )
        self._pool.ensure_storage(layers, kv_heads, head_dim, dtype, self._device)
        self._reserved = 0
        self._lock = threading.Condition()
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._active: dict[str, _Seq] = {}
        self._closed = False
        self._dead: BaseException | None = None
        self._prefill_computed = 0
        self._prefill_cached = 0
        self._recent: deque[tuple[float, int]] = deque(maxlen=4096)
        self._decode_token_s = 0.0  # EWMA of a batched decode forward's time per sequence (heartbeats report it)
        # A step's prefill time as a line in its tokens, fitted over recent steps: its slope is what heartbeats report.
        self._prefill_fit = PrefillFit()
        self._batch: _Batch | None = None
        self._score_ids = 0
        self._worker = threading.Thread(target=self._run, name="torch-engine", daemon=True)
        self._worker.start()

    # ----------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_folder(cls, path: str | Path, config: EngineConfig | None = None) -> TorchEngine:
        """Load a model folder (``ModelLoadError`` when missing or corrupt) and start the worker."""
        from node.inference._modelio import load_model

        cfg = config or EngineConfig()
        model, tok, info = load_model(Path(path), device=_resolve_device(cfg.device))
        return cls(model, tok, info=info, config=cfg)

    def _kv_shape(self) -> tuple[int, int, int, torch.dtype]:
        """(layers, kv heads, head dim, dtype) of the model's KV, read from one real one-token forward."""
        import torch

        with torch.inference_mode():
            out = self._model(input_ids=torch.tensor([[0]], device=self._device), use_cache=True, logits_to_keep=1)
        layers = out.cache.layers
        keys = layers[0].keys
        return len(layers), int(keys.shape[1]), int(keys.shape[3]), keys.dtype

    # ------------------------------------------------------------------------------------------------- public API
    @property
    def model_id(self) -> ModelId:
        """The served model's id, ``ModelId.ZERO`` when the folder had no metadata."""
        return self._info.model_id if self._info else ModelId.ZERO

    @property
    def max_context(self) -> int:
        """Longest prompt + completion in tokens."""
        return self._max_context

    @property
    def kv_block_bytes(self) -> int:
        """Bytes one 16-token KV block takes (all layers, keys and values)."""
        return self._pool.block_bytes

    @property
    def kv_blocks(self) -> int:
        """Blocks in the KV pool."""
        return self._pool.num_blocks

    def tokenize(self, text: str) -> list[int]:
        """The engine's tokenization of ``text`` (no special tokens added)."""
        return list(self._tok.encode(text, add_special_tokens=False))

    def detokenize(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids``, special tokens skipped."""
        return str(self._tok.decode(list(token_ids), skip_special_tokens=True))

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        """Stream a completion; see ``Engine.generate``."""
        self._check_open()
        prompt_ids, hashes = await self._prepare(request.prompt)
        if len(prompt_ids) >= self._max_context:
            raise InvalidParams(
                param="prompt", value=len(prompt_ids), reason=f"longer than context {self._max_context}"
            )
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[GenerationChunk | ScoreResult | BaseException] = asyncio.Queue()  # <= max_tokens + 1

        def emit(item: GenerationChunk | ScoreResult | BaseException) -> None:
            with contextlib.suppress(RuntimeError):  # loop closed: the consumer is gone
                loop.call_soon_threadsafe(queue.put_nowait, item)

        seq = _Seq(
            request_id=request.request_id,
            kind="generate",
            prompt_ids=prompt_ids,
            prompt_hashes=hashes,
            params=request.params,
            emit=emit,
            score_from=len(prompt_ids),
            tokens=list(prompt_ids),
            max_total=min(len(prompt_ids) + request.params.max_tokens, self._max_context),
        )
        self._submit(seq)
        finished = False
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), timeout=self._config.chunk_timeout_s)
                except TimeoutError as exc:
                    raise EngineTimeout(seconds=self._config.chunk_timeout_s) from exc
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                assert isinstance(item, GenerationChunk)
                if item.finish_reason is not None:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._abort_now(request.request_id)

    async def score(self, prompt: str | Sequence[int], completion: str | Sequence[int]) -> ScoreResult:
        """Teacher-forced log-probs of ``completion`` after ``prompt``, queued and batched like ``generate``."""
        self._check_open()
        p_ids, p_hashes = await self._prepare(prompt if isinstance(prompt, str) else tuple(prompt))
        c_ids = await asyncio.to_thread(self.tokenize, completion) if isinstance(completion, str) else list(completion)
        if not c_ids:
            return ScoreResult(token_ids=(), logprobs=(), prompt_tokens=len(p_ids))
        if any(t < 0 or t >= self._vocab for t in c_ids):
            raise InvalidParams(param="completion", value=None, reason="token id outside the vocabulary")
        total = len(p_ids) + len(c_ids)
        if total > self._max_context:
            raise InvalidParams(
                param="completion", value=len(c_ids), reason=f"prompt + completion exceed context {self._max_context}"
            )
        loop = asyncio.get_running_loop()
        done: asyncio.Future[GenerationChunk | ScoreResult | BaseException] = loop.create_future()

        def emit(item: GenerationChunk | ScoreResult | BaseException) -> None:
            def settle() -> None:
                if not done.done():
                    done.set_result(item)

            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle)

        with self._lock:
            self._score_ids += 1
            rid = f"\x00score-{self._score_ids}"  # cannot collide: request ids from callers are printable
        seq = _Seq(
            request_id=rid,
            kind="score",
            prompt_ids=p_ids,
            prompt_hashes=p_hashes,
            params=SamplingParams(max_tokens=1, temperature=0),
            emit=emit,
            score_from=len(p_ids),
            tokens=p_ids + c_ids,
            max_total=total,
        )
        self._submit(seq)
        try:
            item = await asyncio.wait_for(done, timeout=self._config.chunk_timeout_s)
        except TimeoutError as exc:
            self._abort_now(rid)
            raise EngineTimeout(seconds=self._config.chunk_timeout_s) from exc
        except asyncio.CancelledError:
            self._abort_now(rid)
            raise
        if isinstance(item, BaseException):
            raise item
        assert isinstance(item, ScoreResult)
        return item

    def stats(self) -> EngineStats:
        """Queue, running, cache summary and recent throughput."""
        with self._lock:
            now = time.monotonic()
            window = [(t, n) for t, n in self._recent if now - t <= 10.0]
            tps = 0.0
            if window:
                span = max(now - window[0][0], 1e-3)
                tps = sum(n for _, n in window) / span
            return EngineStats(
                model_id=self.model_id,
                queued_requests=len(self._waiting),
                running_requests=len(self._running),
                queued_tokens=sum(len(s.tokens) for s in self._waiting)
                + sum(max(0, len(s.tokens) - s.computed) for s in self._running if s.prefilling),
                cached_prefix_hashes=self._pool.snapshot(self._config.advertise_limit),
                cache_bytes=self._pool.cached_blocks() * self._pool.block_bytes,
                prefill_tokens_computed=self._prefill_computed,
                prefill_tokens_cached=self._prefill_cached,
                tokens_per_second=tps,
                decode_backlog_tokens=sum(
                    max(0, s.params.max_tokens - len(s.generated))
                    for s in (*self._waiting, *self._running)
                    if s.kind == "generate"
                ),
                seconds_per_decode_token=self._decode_token_s,
                seconds_per_prefill_token=self._prefill_fit.slope(),
            )

    async def abort(self, request_id: str) -> bool:
        """Abort a queued or running request; its stream ends with ``finish_reason="abort"``."""
        return self._abort_now(request_id)

    async def check_health(self) -> bool:
        """True while the worker is alive and the engine open."""
        return not self._closed and self._dead is None and self._worker.is_alive()

    async def close(self) -> None:
        """Abort everything, stop the worker and drop the cache."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = list(self._active.values())
            self._lock.notify_all()
        for seq in pending:
            seq.emit(EngineClosed())
        await asyncio.to_thread(self._worker.join, 30.0)
        with self._lock:
            self._pool.clear()
            self._active.clear()
            self._waiting.clear()
            self._running.clear()

    def clear_prefix_cache(self) -> None:
        """Drop every cached block not in use (benchmarks use this between runs)."""
        with self._lock:
            self._pool.clear()

    # -------------------------------------------------------------------------------------------------- helpers
    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosed()
        if self._dead is not None:
            raise EngineClosed(f"engine worker died ({type(self._dead).__name__})")

    async def _prepare(self, prompt: str | tuple[int, ...]) -> tuple[list[int], list[bytes]]:
        """Token ids and chunk hashes of a prompt, computed off the event loop (a 64 KiB prompt takes ~50 ms)."""
        return await asyncio.to_thread(self._prepare_sync, prompt)

    def _prepare_sync(self, prompt: str | tuple[int, ...]) -> tuple[list[int], list[bytes]]:
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise InvalidParams(param="prompt", value=0, reason="tokenizes to nothing")
        if max(ids) >= self._vocab:
            raise InvalidParams(param="prompt", value=None, reason="token id outside the vocabulary")
        if len(ids) >= self._max_context:
            return ids, []
        return ids, chunk_hashes(ids)

    def _submit(self, seq: _Seq) -> None:
        need = math.ceil(seq.max_total / CHUNK_TOKENS)
        if need > self._pool.num_blocks:
            raise InvalidParams(
                param="prompt", value=len(seq.prompt_ids), reason="needs more KV blocks than the engine holds"
            )
        with self._lock:
            self._check_open()
            if seq.request_id in self._active:
                raise InvalidParams(param="request_id", value=seq.request_id, reason="already in flight")
            if len(self._waiting) >= self._config.max_queue:
                raise EngineOverloaded(queued=len(self._waiting), limit=self._config.max_queue)
            self._waiting.append(seq)
            self._active[seq.request_id] = seq
            self._lock.notify_all()

    def _abort_now(self, request_id: str) -> bool:
        with self._lock:
            seq = self._active.get(request_id)
            if seq is None:
                return False
            seq.aborted = True
            if seq in self._waiting:
                self._waiting.remove(seq)
                del self._active[request_id]
                aborted = self._chunk(seq, [], [], "", "abort") if seq.kind == "generate" else None
                seq.emit(aborted or InferenceError("score aborted"))
            self._lock.notify_all()
            return True

    def _chunk(
        self, seq: _Seq, ids: list[int], logprobs: list[float], text: str, finish: FinishReason | None
    ) -> GenerationChunk:
        return GenerationChunk(
            request_id=seq.request_id,
            token_ids=tuple(ids),
            logprobs=tuple(logprobs),
            text=text,
            finish_reason=finish,
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=len(seq.generated),
            cached_tokens=seq.cached_tokens,
        )

    # ------------------------------------------------------------------------------------------- worker thread
    def _run(self) -> None:
        import torch

        try:
            with torch.inference_mode():
                while True:
                    with self._lock:
                        while not self._closed and not self._waiting and not self._running:
                            self._lock.wait(timeout=1.0)
                        if self._closed:
                            return
                    self._step()
        except BaseException as exc:  # the worker must never die silently
            self._dead = exc
            with self._lock:
                for seq in self._active.values():
                    seq.emit(EngineClosed(f"engine worker died ({type(exc).__name__})"))
            raise

    def _step(self) -> None:
        """One scheduler step under the token budget, admitting by free blocks.

        Order: every decode (one token each); then *short* prefills (at most a quarter of the budget left to compute,
        running or waiting), which may use half the budget while long prefills are pending; then long prefills,
        running ones first, then waiting ones in :meth:`_waiting_order`. So a short prompt arriving behind a burst
        of long ones gets its first token after about one step (vLLM's chunked prefill lets short prompts jump the
        queue the same way), and the long ones still progress every step.
        """
        with self._lock:
            running = list(self._running)
        live: list[_Seq] = []
        for seq in running:
            if seq.aborted:
                self._finish(seq, "abort", [], [])
            else:
                live.append(seq)
        decodes = [s for s in live if not s.prefilling]
        budget = self._config.max_batch_tokens - len(decodes)
        short = self._config.max_batch_tokens // 4
        chunks: list[tuple[_Seq, int]] = []
        prefilling = [s for s in live if s.prefilling]
        with self._lock:
            order = self._waiting_order()
            pending = [(s, len(s.tokens) - s.computed) for s in prefilling] + [(s, left) for s, left in order]
            long_pending = any(left > short for _, left in pending)
            short_budget = budget // 2 if long_pending else budget
            spent = 0
            blocked = False  # once one request cannot be admitted, none behind it is (no overtaking on memory)
            for phase in ("short", "long"):
                cap = short_budget if phase == "short" else budget
                for seq, left in pending:
                    if (left <= short) != (phase == "short") or spent >= cap:
                        continue
                    if not seq.admitted:
                        if blocked or len(self._running) >= self._config.max_running or not self._admit(seq):
                            blocked = True
                            continue
                        left = len(seq.tokens) - seq.computed
                    n = min(left, cap - spent)
                    chunks.append((seq, n))
                    spent += n
        if decodes:
            started = time.perf_counter()
            self._decode(decodes)
            # The batched decode forward's time per sequence: the node's decode throughput cost per token (prefill
            # chunks are counted apart, as the prompt tokens still to compute).
            sample = (time.perf_counter() - started) / len(decodes)
            with self._lock:
                previous = self._decode_token_s
                self._decode_token_s = sample if previous == 0.0 else previous + _DECODE_EWMA * (sample - previous)
        if chunks:
            started = time.perf_counter()
            for seq, n in chunks:
                self._guarded(seq, functools.partial(self._prefill_chunk, n=n))
            elapsed = time.perf_counter() - started
            with self._lock:
                self._prefill_fit.add(sum(n for _, n in chunks), elapsed)

    def _waiting_order(self) -> list[tuple[_Seq, int]]:
        """Waiting requests with the tokens each has left to compute, in admission order; called under the lock.

        Requests waiting longer than ``_FAIRNESS_S`` come first (oldest first); then the longest cached prefix first,
        so requests sharing a prefix are admitted together while it is cached; FIFO among equals.
        """
        now = time.monotonic()
        scored = []
        for pos, seq in enumerate(self._waiting):
            hit = len(self._pool.match(seq.prompt_hashes[: self._matchable(seq)])) if self._pool.reuse else 0
            starving = now - seq.arrival > _FAIRNESS_S
            scored.append(
                (0 if starving else 1, 0 if starving else -hit, pos, seq, len(seq.tokens) - hit * CHUNK_TOKENS)
            )
        scored.sort(key=lambda row: row[:3])
        return [(row[3], row[4]) for row in scored]

    @staticmethod
    def _matchable(seq: _Seq) -> int:
        # Leave at least one prompt token to compute: its logits start the completion (or the scored range).
        return (seq.score_from - 1) // CHUNK_TOKENS

    def _admit(self, seq: _Seq) -> bool:
        """Move ``seq`` from waiting to running if the pool can hold all of it; called under the lock."""
        matched = self._pool.match(seq.prompt_hashes[: self._matchable(seq)])
        idle_matched = sum(1 for b in matched if self._pool.refs(b) == 0)
        need = math.ceil(seq.max_total / CHUNK_TOKENS) - len(matched)
        if self._pool.available() - idle_matched - self._reserved < need:
            return False
        self._waiting.remove(seq)
        self._pool.acquire(matched)
        seq.table = list(matched)
        seq.hashes = [seq.prompt_hashes[i] for i in range(len(matched))]
        seq.computed = seq.cached_tokens = len(matched) * CHUNK_TOKENS
        seq.reserved = need
        self._reserved += need
        seq.admitted = True
        self._prefill_cached += seq.computed if seq.kind == "generate" else 0
        self._running.append(seq)
        return True

    def _guarded(self, seq: _Seq, step: Callable[[_Seq], None]) -> None:
        if self._closed:
            return
        if seq.aborted:
            self._finish(seq, "abort", [], [])
            return
        try:
            step(seq)
        except InferenceError as exc:
            self._retire(seq)
            seq.emit(exc)
        except Exception as exc:  # a failed forward fails this request only
            self._retire(seq)
            seq.emit(InferenceError(f"generation failed ({type(exc).__name__})"))

    def _retire(self, seq: _Seq) -> None:
        """Give back the sequence's blocks and reservation, and forget it (before its last chunk is emitted)."""
        with self._lock:
            if seq in self._running:
                self._running.remove(seq)
            if seq in self._waiting:
                self._waiting.remove(seq)
            self._active.pop(seq.request_id, None)
            if seq.admitted:
                self._pool.release(seq.table)
                self._reserved -= seq.reserved
                seq.admitted = False
            seq.table = []
            seq.reserved = 0
        seq.next_logits = None

    # ----------------------------------------------------------------------------------------------- KV blocks
    def _ensure_blocks(self, seq: _Seq, tokens: int) -> None:
        with self._lock:
            while len(seq.table) * CHUNK_TOKENS < tokens:
                block = self._pool.allocate()
                if block is None or seq.reserved <= 0:
                    raise InferenceError("KV block pool exhausted despite the reservation")
                seq.table.append(block)
                seq.reserved -= 1
                self._reserved -= 1

    def _write(self, seq: _Seq, start: int, keys: Any, values: Any) -> None:
        """Store rows for positions ``start..`` (``keys``/``values``: ``[layers, kv_heads, n, head_dim]``)."""
        n = int(keys.shape[2])
        pos = 0
        pool = self._pool
        while pos < n:
            p = start + pos
            block, off = seq.table[p // CHUNK_TOKENS], p % CHUNK_TOKENS
            m = min(CHUNK_TOKENS - off, n - pos)
            pool.keys[:, block, :, off : off + m, :] = keys[:, :, pos : pos + m, :]
            pool.values[:, block, :, off : off + m, :] = values[:, :, pos : pos + m, :]
            pos += m
        self._commit_full(seq, start + n)

    def _commit_full(self, seq: _Seq, computed: int) -> None:
        """Hash the blocks that just became full and hand them to the pool (which may dedupe them)."""
        seq.computed = computed
        full = computed // CHUNK_TOKENS
        if not self._pool.reuse:
            return
        with self._lock:
            while len(seq.hashes) < full:
                i = len(seq.hashes)
                prev = seq.hashes[i - 1] if i else ROOT
                h = chain_hash(prev, seq.tokens[i * CHUNK_TOKENS : (i + 1) * CHUNK_TOKENS])
                seq.table[i] = self._pool.commit(seq.table[i], h, seq.table[i - 1] if i else None)
                seq.hashes.append(h)

    def _gather(self, seqs: list[_Seq]) -> tuple[list[tuple[Any, Any]], Any]:
        """Per-layer ``[B, kv_heads, T, head_dim]`` keys/values of each sequence's computed tokens, right-padded to
        whole blocks, and the ``[B, T]`` mask marking the real rows."""
        import torch

        n = max(math.ceil(s.computed / CHUNK_TOKENS) for s in seqs)
        rows = [s.table[: math.ceil(s.computed / CHUNK_TOKENS)] for s in seqs]
        idx = torch.tensor([r + [r[0] if r else 0] * (n - len(r)) for r in rows], device=self._device)
        pool = self._pool
        b, layers = len(seqs), pool.keys.shape[0]
        heads, dim = pool.keys.shape[2], pool.keys.shape[4]
        k = pool.keys[:, idx]  # [L, B, n, H, T, D]
        v = pool.values[:, idx]
        k = k.permute(0, 1, 3, 2, 4, 5).reshape(layers, b, heads, n * CHUNK_TOKENS, dim)
        v = v.permute(0, 1, 3, 2, 4, 5).reshape(layers, b, heads, n * CHUNK_TOKENS, dim)
        mask = torch.zeros(b, n * CHUNK_TOKENS, dtype=torch.long, device=self._device)
        for i, s in enumerate(seqs):
            mask[i, : s.computed] = 1
        return [(k[li], v[li]) for li in range(layers)], mask

    # ------------------------------------------------------------------------------------------------ forwards
    def _prefill_chunk(self, seq: _Seq, n: int) -> None:
        """Compute the next ``n`` uncomputed tokens of ``seq`` against its gathered prefix."""
        import torch

        start = seq.computed
        self._ensure_blocks(seq, start + n)
        if start:
            layers, _ = self._gather([seq])
            past = _cache_of([(k[:, :, :start, :], v[:, :, :start, :]) for k, v in layers])
        else:
            from transformers import DynamicCache

            past = DynamicCache()
        end = start + n
        want_rows = 0
        if seq.kind == "score":
            first, last = max(start, seq.score_from - 1), min(end, len(seq.tokens) - 1)
            want_rows = max(0, last - first)
        keep = 0 if want_rows else 1
        out = self._model(
            input_ids=torch.tensor([seq.tokens[start:end]], device=self._device),
            cache=past,
            use_cache=True,
            logits_to_keep=keep,
        )
        keys = torch.stack([layer.keys[0, :, start:end, :] for layer in out.cache.layers])
        values = torch.stack([layer.values[0, :, start:end, :] for layer in out.cache.layers])
        self._write(seq, start, keys, values)
        with self._lock:
            self._prefill_computed += n if seq.kind == "generate" else 0
        if seq.kind == "score":
            if want_rows:
                logits = out.logits[0, first - start : last - start].float()
                logp = torch.log_softmax(logits, dim=-1)
                target = torch.tensor(seq.tokens[first + 1 : last + 1], device=logp.device)
                seq.score_logprobs.extend(float(x) for x in logp.gather(1, target[:, None])[:, 0].cpu())
            if end >= len(seq.tokens):
                result = ScoreResult(
                    token_ids=tuple(seq.tokens[seq.score_from :]),
                    logprobs=tuple(seq.score_logprobs),
                    prompt_tokens=seq.score_from,
                )
                self._retire(seq)
                seq.emit(result)
            return
        if end < len(seq.tokens):
            return
        seq.next_logits = out.logits[0, -1].float()
        if seq.params.seed is not None or not seq.params.greedy:
            seq.generator = torch.Generator(device="cpu")
            seq.generator.manual_seed(seq.params.seed if seq.params.seed is not None else random.getrandbits(63))
        self._sample_and_emit(seq)

    def _decode(self, seqs: list[_Seq]) -> None:
        """Advance every decoding sequence by one token with ONE batched forward over KV gathered from the blocks.

        Padding rows get zero attention weight (mask), positions are passed per sequence so RoPE sees true positions,
        and the new rows are written back to each sequence's last block. While the decoding set is unchanged the
        gathered cache is kept and grows by one row per step, so blocks are re-gathered only when it changes.
        """
        import torch

        try:
            for seq in seqs:
                self._ensure_blocks(seq, seq.computed + 1)
            batch = self._batch
            if (
                batch is not None
                and len(batch.seqs) == len(seqs)
                and all(x is y for x, y in zip(batch.seqs, seqs, strict=True))
            ):
                cache, mask = batch.cache, batch.mask
            else:
                layers, mask = self._gather(seqs)
                cache = _cache_of(layers)
            mask = torch.cat([mask, torch.ones(len(seqs), 1, dtype=torch.long, device=self._device)], dim=1)
            self._batch = None
            config = self._model.config
            # On CPU, torch's SDPA kernel is several times slower than plain matmul attention for batched one-token
            # queries against long caches (measured: 16 x 1040 keys, 370 ms vs 65 ms), while SDPA wins for prefill.
            previous = config._attn_implementation
            if self._device.type == "cpu" and len(seqs) > 1:
                config._attn_implementation = "eager"
            try:
                out = self._model(
                    input_ids=torch.tensor([[s.tokens[s.computed]] for s in seqs], device=self._device),
                    attention_mask=mask,
                    position_ids=torch.tensor([[s.computed] for s in seqs], device=self._device),
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
            finally:
                config._attn_implementation = previous
            new_k = torch.stack([layer.keys[:, :, -1, :] for layer in out.cache.layers])  # [L, B, H, D]
            new_v = torch.stack([layer.values[:, :, -1, :] for layer in out.cache.layers])
            blocks = torch.tensor([s.table[s.computed // CHUNK_TOKENS] for s in seqs], device=self._device)
            offsets = torch.tensor([s.computed % CHUNK_TOKENS for s in seqs], device=self._device)
            self._pool.keys[:, blocks, :, offsets, :] = new_k.permute(1, 0, 2, 3)
            self._pool.values[:, blocks, :, offsets, :] = new_v.permute(1, 0, 2, 3)
            for i, seq in enumerate(seqs):
                self._commit_full(seq, seq.computed + 1)
                seq.next_logits = out.logits[i, -1].float()
        except Exception as exc:  # a failed forward fails the requests in it, not the engine
            self._batch = None
            for seq in seqs:
                self._retire(seq)
                seq.emit(InferenceError(f"generation failed ({type(exc).__name__})"))
            return
        self._batch = _Batch(seqs=list(seqs), cache=out.cache, mask=mask)
        for seq in seqs:
            self._guarded(seq, self._sample_and_emit)

    # ------------------------------------------------------------------------------------------------ sampling
    def _sample_and_emit(self, seq: _Seq) -> None:
        token, logprob = _sample(seq.next_logits, seq.params, seq.generator)
        with self._lock:
            self._recent.append((time.monotonic(), 1))
        seq.generated.append(token)
        seq.tokens.append(token)
        if self._eos is not None and token == self._eos:
            # The end-of-sequence token is reported with its log-prob (a verifier scores it too); it has no text.
            self._finish(seq, "stop", [token], [logprob])
            return
        self._detokenize_step(seq)
        stops = seq.params.stop
        if stops:
            cut = min((i for i in (seq.text.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                self._finish(seq, "stop", [token], [logprob], text=seq.text[:cut])
                return
        if len(seq.generated) >= seq.params.max_tokens or len(seq.tokens) >= self._max_context:
            self._finish(seq, "length", [token], [logprob])
            return
        safe = len(seq.text) - (max(len(s) for s in stops) - 1 if stops else 0)
        delta = seq.text[seq.text_sent : safe] if safe > seq.text_sent else ""
        seq.text_sent += len(delta)
        seq.emit(self._chunk(seq, [token], [logprob], delta, None))

    def _detokenize_step(self, seq: _Seq) -> None:
        """Append the new token's text, decoding only a short window (vLLM's prefix/read offsets).

        Decoding the window with and without the newest token and taking the difference keeps tokenizer-specific
        joins (leading spaces, byte fallback) right; while the result ends in an incomplete UTF-8 sequence
        (U+FFFD) nothing is appended and the offsets stay, so the bytes complete on a later token.
        """
        ids = seq.generated
        prefix = self.detokenize(ids[seq.prefix_offset : seq.read_offset])
        full = self.detokenize(ids[seq.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            seq.text += full[len(prefix) :]
            seq.prefix_offset = seq.read_offset
            seq.read_offset = len(ids)

    def _finish(
        self, seq: _Seq, reason: FinishReason, ids: list[int], logprobs: list[float], text: str | None = None
    ) -> None:
        if text is None:
            if reason == "abort":
                text = seq.text
            else:  # flush what the window still holds (an incomplete sequence at the very end stays as U+FFFD)
                prefix = self.detokenize(seq.generated[seq.prefix_offset : seq.read_offset])
                full = self.detokenize(seq.generated[seq.prefix_offset :])
                text = seq.text + (full[len(prefix) :] if len(full) > len(prefix) else "")
        delta = text[seq.text_sent :] if len(text) > seq.text_sent else ""
        if reason == "abort":
            delta = ""
        self._retire(seq)
        if seq.kind == "score":
            seq.emit(InferenceError("score aborted"))
            return
        seq.emit(self._chunk(seq, ids, logprobs, delta, reason))


def _cache_of(layers: Sequence[tuple[Any, Any]]) -> Any:
    """A ``DynamicCache`` holding exactly these tensors, without the copy ``DynamicCache(ddp_cache_data=...)`` makes.

    Only for tensors nobody else writes: the model's own updates concatenate into new storage.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    built: list[Any] = []
    for keys, values in layers:
        layer = DynamicLayer()  # type: ignore[no-untyped-call]
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        built.append(layer)
    cache = DynamicCache()
    cache.layers = list(built)
    return cache


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidParams(param="device", value=device, reason="CUDA is not available")
    if device != "cpu" and not device.startswith("cuda"):
        raise InvalidParams(param="device", value=device, reason="use cpu, cuda[:N] or auto")
    return device


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> tuple[int, float]:
    """Pick the next token; its log-prob is under the raw distribution (what ``score`` reproduces)."""
    import torch

    logp = torch.log_softmax(logits, dim=-1)
    if params.greedy:
        token = int(torch.argmax(logits))
        return token, float(logp[token])
    scaled = logits / params.temperature
    if params.top_k > 0 and params.top_k < scaled.numel():
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop = cumulative - sorted_probs > params.top_p  # keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    token = int(torch.multinomial(probs.cpu(), 1, generator=generator))
    return token, float(logp[token])
