"""The ``torch`` engine: transformers on CPU or CUDA, a bounded scheduler and a real prefix KV cache.

Design (see docs/inference.md):

* One worker thread owns the model. The event loop only enqueues requests and reads chunks, so the async API stays
  responsive while a forward pass runs.
* Continuous batching: each loop first admits waiting requests up to ``max_running`` and prefills them one by one
  (prefill-first, with the prefix cache), then advances every running sequence by one token in ONE batched forward
  (ragged caches left-padded and masked, per-sequence positions). Requests join and leave between steps; the stacked
  cache is reused while the running set is unchanged.
* Back-pressure: at most ``max_queue`` requests wait; beyond that ``generate`` raises ``EngineOverloaded``.
* Prefix cache: prompts are hashed in 16-token chunks (``_prefix``); after prefill the KV of the longest whole-chunk
  prefix is cloned into :class:`PrefixKVCache`, and a later prompt reuses the longest cached prefix so only its suffix
  is computed. ``cached_tokens`` reports the reuse per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node.inference._errors import (
    EngineClosed,
    EngineOverloaded,
    EngineTimeout,
    InferenceError,
    InvalidParams,
)
from node.inference._kvcache import PrefixKVCache
from node.inference._prefix import CHUNK_TOKENS, chunk_hashes
from node.inference._types import (
    EngineStats,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    SamplingParams,
    ScoreResult,
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

    from node.inference._modelio import ModelInfo


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineConfig:
    """Knobs shared by the engines (the TensorRT-LLM adapter uses the queue bounds and the cache switch)."""

    #: "cpu", "cuda", "cuda:N" or "auto" (CUDA when available).
    device: str = "auto"
    #: Requests allowed to wait for admission before ``EngineOverloaded``, >= 1.
    max_queue: int = 64
    #: Sequences decoded concurrently, >= 1.
    max_running: int = 8
    #: Bytes of KV the prefix cache may hold; 0 disables prefix reuse.
    prefix_cache_bytes: int = 256 * 1024 * 1024
    #: Most chunk hashes ``stats`` advertises.
    advertise_limit: int = 1024
    #: Longest wait for the next chunk of a stream before ``EngineTimeout``, seconds.
    chunk_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.max_queue < 1:
            raise InvalidParams(param="max_queue", value=self.max_queue, reason="must be >= 1")
        if self.max_running < 1:
            raise InvalidParams(param="max_running", value=self.max_running, reason="must be >= 1")
        if self.prefix_cache_bytes < 0:
            raise InvalidParams(param="prefix_cache_bytes", value=self.prefix_cache_bytes, reason="must be >= 0")
        if self.chunk_timeout_s <= 0:
            raise InvalidParams(param="chunk_timeout_s", value=self.chunk_timeout_s, reason="must be > 0")


_Emit = Callable[[GenerationChunk | BaseException], None]


@dataclass(slots=True, eq=False)
class _Seq:
    """A request's state; touched only by the worker thread once admitted."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    emit: _Emit
    generated: list[int] = field(default_factory=list)
    past: Any = None
    next_logits: Any = None
    generator: Any = None
    cached_tokens: int = 0
    text_sent: int = 0
    aborted: bool = False


@dataclass(slots=True, eq=False)
class _Batch:
    """The stacked KV of the last batched decode step, reused while the same sequences keep running."""

    seqs: list[_Seq]
    cache: Any
    lens: list[int]
    longest: int
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
        self._cache = PrefixKVCache(self._config.prefix_cache_bytes, CHUNK_TOKENS)
        self._lock = threading.Condition()
        self._compute = threading.Lock()
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._active: dict[str, _Seq] = {}
        self._closed = False
        self._dead: BaseException | None = None
        self._prefill_computed = 0
        self._prefill_cached = 0
        self._recent: deque[tuple[float, int]] = deque(maxlen=4096)
        self._batch: _Batch | None = None
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

    # ------------------------------------------------------------------------------------------------- public API
    @property
    def model_id(self) -> str:
        """The served model's id, "" when the folder had no metadata."""
        return self._info.model_id if self._info else ""

    @property
    def max_context(self) -> int:
        """Longest prompt + completion in tokens."""
        return self._max_context

    def tokenize(self, text: str) -> list[int]:
        """The engine's tokenization of ``text`` (no special tokens added)."""
        return list(self._tok.encode(text, add_special_tokens=False))

    def detokenize(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids``, special tokens skipped."""
        return str(self._tok.decode(list(token_ids), skip_special_tokens=True))

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        """Stream a completion; see ``Engine.generate``."""
        self._check_open()
        prompt_ids = self._prompt_ids(request.prompt)
        if len(prompt_ids) >= self._max_context:
            raise InvalidParams(
                param="prompt", value=len(prompt_ids), reason=f"longer than context {self._max_context}"
            )
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[GenerationChunk | BaseException] = asyncio.Queue()  # bounded by max_tokens + 1 items

        def emit(item: GenerationChunk | BaseException) -> None:
            with contextlib.suppress(RuntimeError):  # loop closed: the consumer is gone
                loop.call_soon_threadsafe(queue.put_nowait, item)

        seq = _Seq(request_id=request.request_id, prompt_ids=prompt_ids, params=request.params, emit=emit)
        with self._lock:
            self._check_open()
            if request.request_id in self._active:
                raise InvalidParams(param="request_id", value=request.request_id, reason="already in flight")
            if len(self._waiting) >= self._config.max_queue:
                raise EngineOverloaded(queued=len(self._waiting), limit=self._config.max_queue)
            self._waiting.append(seq)
            self._active[request.request_id] = seq
            self._lock.notify_all()
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
                if item.finish_reason is not None:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._abort_now(request.request_id)

    async def score(self, prompt: str | Sequence[int], completion: str | Sequence[int]) -> ScoreResult:
        """Teacher-forced log-probs of ``completion`` after ``prompt``."""
        self._check_open()
        p_ids = self._prompt_ids(prompt if isinstance(prompt, str) else tuple(prompt))
        c_ids = self.tokenize(completion) if isinstance(completion, str) else list(completion)
        if not c_ids:
            return ScoreResult(token_ids=(), logprobs=(), prompt_tokens=len(p_ids))
        if any(t < 0 or t >= self._vocab for t in c_ids):
            raise InvalidParams(param="completion", value=None, reason="token id outside the vocabulary")
        if len(p_ids) + len(c_ids) > self._max_context:
            raise InvalidParams(
                param="completion", value=len(c_ids), reason=f"prompt + completion exceed context {self._max_context}"
            )
        logprobs = await asyncio.to_thread(self._score_sync, p_ids, c_ids)
        return ScoreResult(token_ids=tuple(c_ids), logprobs=tuple(logprobs), prompt_tokens=len(p_ids))

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
                queued_tokens=sum(len(s.prompt_ids) for s in self._waiting),
                cached_prefix_hashes=self._cache.snapshot(self._config.advertise_limit),
                cache_bytes=self._cache.nbytes,
                prefill_tokens_computed=self._prefill_computed,
                prefill_tokens_cached=self._prefill_cached,
                tokens_per_second=tps,
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
            self._cache.clear()
            self._active.clear()
            self._waiting.clear()
            self._running.clear()

    def clear_prefix_cache(self) -> None:
        """Drop every cached prefix (benchmarks use this between runs)."""
        with self._lock:
            self._cache.clear()

    # -------------------------------------------------------------------------------------------------- helpers
    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosed()
        if self._dead is not None:
            raise EngineClosed(f"engine worker died ({type(self._dead).__name__})")

    def _prompt_ids(self, prompt: str | tuple[int, ...]) -> list[int]:
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise InvalidParams(param="prompt", value=0, reason="tokenizes to nothing")
        if any(t >= self._vocab for t in ids):
            raise InvalidParams(param="prompt", value=None, reason="token id outside the vocabulary")
        return ids

    def _abort_now(self, request_id: str) -> bool:
        with self._lock:
            seq = self._active.get(request_id)
            if seq is None:
                return False
            seq.aborted = True
            if seq in self._waiting:
                self._waiting.remove(seq)
                del self._active[request_id]
                seq.emit(self._chunk(seq, [], [], "", "abort"))
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
                    # Prefill first: a new arrival waits for at most one (batched) decode step.
                    self._admit_and_prefill()
                    self._decode_step([seq for seq in list(self._running) if seq.past is not None])
        except BaseException as exc:  # the worker must never die silently
            self._dead = exc
            with self._lock:
                for seq in self._active.values():
                    seq.emit(EngineClosed(f"engine worker died ({type(exc).__name__})"))
            raise

    def _admit_and_prefill(self) -> None:
        with self._lock:
            admitted: list[_Seq] = []
            while self._waiting and len(self._running) + len(admitted) < self._config.max_running:
                admitted.append(self._waiting.popleft())
            self._running.extend(admitted)
        for seq in admitted:
            self._guarded(seq, self._prefill)

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
        with self._lock:
            if seq in self._running:
                self._running.remove(seq)
            self._active.pop(seq.request_id, None)
        seq.past = None
        seq.next_logits = None

    def _prefill(self, seq: _Seq) -> None:
        import torch
        from transformers import DynamicCache

        ids = seq.prompt_ids
        hashes = chunk_hashes(ids)
        usable = hashes[: (len(ids) - 1) // CHUNK_TOKENS]  # always compute >= 1 token to get logits
        past = DynamicCache()
        start = 0
        if self._cache.enabled and usable:
            with self._lock:
                n, layers = self._cache.lookup(usable)
            if layers is not None:
                past = DynamicCache(ddp_cache_data=layers)  # copies into fresh tensors on first update
                start = n * CHUNK_TOKENS
        seq.cached_tokens = start
        with self._compute:
            out = self._model(
                input_ids=torch.tensor([ids[start:]], device=self._device), cache=past, use_cache=True, logits_to_keep=1
            )
        seq.past = out.cache
        seq.next_logits = out.logits[0, -1].float()
        with self._lock:
            self._prefill_computed += len(ids) - start
            self._prefill_cached += start
        if seq.params.seed is not None or not seq.params.greedy:
            seq.generator = torch.Generator(device="cpu")
            seq.generator.manual_seed(seq.params.seed if seq.params.seed is not None else random.getrandbits(63))
        past = seq.past  # the first token goes out before the (cloning) cache insert, to keep TTFT low
        self._sample_and_emit(seq)
        n_store = len(hashes)
        if self._cache.enabled and n_store * CHUNK_TOKENS > start:
            tokens = n_store * CHUNK_TOKENS
            layers_out = tuple(
                (layer.keys[:, :, :tokens, :].clone(), layer.values[:, :, :tokens, :].clone()) for layer in past.layers
            )
            with self._lock:
                self._cache.insert(hashes, layers_out)

    def _decode_step(self, seqs: list[_Seq]) -> None:
        """Advance every running sequence by one token with ONE batched forward.

        Each sequence's KV is left-padded to the longest, stacked along the batch, and masked; positions are passed
        per sequence so RoPE sees true positions. Afterwards each sequence keeps a view of its own rows (tensors are
        never written in place, so views are safe). Padding keys get zero attention weight, so results equal the
        unbatched ones up to float rounding.
        """
        import torch

        live: list[_Seq] = []
        for seq in seqs:
            if self._closed:
                return
            if seq.aborted:
                self._finish(seq, "abort", [], [])
            else:
                live.append(seq)
        if not live:
            return
        try:
            if len(live) == 1:
                self._batch = None
                self._decode_one(live[0])
            else:
                self._decode_batched(live, torch)
        except Exception as exc:  # a failed forward fails the requests in it, not the engine
            for seq in live:
                self._retire(seq)
                seq.emit(InferenceError(f"generation failed ({type(exc).__name__})"))
            return
        for seq in live:
            self._guarded(seq, self._sample_and_emit)

    def _decode_one(self, seq: _Seq) -> None:
        import torch

        with self._compute:
            out = self._model(
                input_ids=torch.tensor([[seq.generated[-1]]], device=self._device),
                cache=seq.past,
                use_cache=True,
                logits_to_keep=1,
            )
        seq.past = out.cache
        seq.next_logits = out.logits[0, -1].float()

    def _decode_batched(self, seqs: list[_Seq], torch: Any) -> None:
        batch = self._batch
        same = batch is not None and len(batch.seqs) == len(seqs)
        if batch is not None and same and all(x is y for x, y in zip(batch.seqs, seqs, strict=True)):
            # Same sequences as the last step: reuse the stacked cache as is (no re-padding, no copy).
            cache, lens, longest, mask = batch.cache, batch.lens, batch.longest, batch.mask
        else:
            lens = [int(seq.past.get_seq_length()) for seq in seqs]
            longest = max(lens)
            stacked = []
            for li in range(len(seqs[0].past.layers)):
                keys, values = [], []
                for seq, length in zip(seqs, lens, strict=True):
                    layer = seq.past.layers[li]
                    pad = (0, 0, longest - length, 0)
                    keys.append(torch.nn.functional.pad(layer.keys, pad) if length < longest else layer.keys)
                    values.append(torch.nn.functional.pad(layer.values, pad) if length < longest else layer.values)
                stacked.append((torch.cat(keys), torch.cat(values)))
            cache = _cache_of(stacked)
            mask = torch.ones(len(seqs), longest, dtype=torch.long, device=self._device)
            for i, length in enumerate(lens):
                mask[i, : longest - length] = 0
        mask = torch.cat([mask, torch.ones(len(seqs), 1, dtype=torch.long, device=self._device)], dim=1)
        self._batch = None
        config = self._model.config
        with self._compute:
            # On CPU, torch's SDPA kernel is several times slower than plain matmul attention for batched one-token
            # queries against long caches (measured: 16 x 1040 keys, 370 ms vs 65 ms), while SDPA wins for prefill.
            # So batched decode steps use eager attention on CPU; the switch is read per forward, under the lock.
            previous = config._attn_implementation
            if self._device.type == "cpu":
                config._attn_implementation = "eager"
            try:
                out = self._model(
                    input_ids=torch.tensor([[seq.generated[-1]] for seq in seqs], device=self._device),
                    attention_mask=mask,
                    position_ids=torch.tensor([[length] for length in lens], device=self._device),
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
            finally:
                config._attn_implementation = previous
        for i, (seq, length) in enumerate(zip(seqs, lens, strict=True)):
            start = longest - length
            rows = [
                (layer.keys[i : i + 1, :, start:, :], layer.values[i : i + 1, :, start:, :])
                for layer in out.cache.layers
            ]
            seq.past = _cache_of(rows)  # views of this sequence's rows, used when the batch changes
            seq.next_logits = out.logits[i, -1].float()
        self._batch = _Batch(
            seqs=list(seqs), cache=out.cache, lens=[n + 1 for n in lens], longest=longest + 1, mask=mask
        )

    def _sample_and_emit(self, seq: _Seq) -> None:
        token, logprob = _sample(seq.next_logits, seq.params, seq.generator)
        with self._lock:
            self._recent.append((time.monotonic(), 1))
        if self._eos is not None and token == self._eos:
            self._finish(seq, "stop", [], [])
            return
        seq.generated.append(token)
        text = self.detokenize(seq.generated)
        stops = seq.params.stop
        if stops:
            cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                self._finish(seq, "stop", [token], [logprob], text=text[:cut])
                return
        if len(seq.generated) >= seq.params.max_tokens or len(seq.prompt_ids) + len(seq.generated) >= self._max_context:
            self._finish(seq, "length", [token], [logprob], text=text)
            return
        safe = len(text) - (max(len(s) for s in stops) - 1 if stops else 0)
        while safe > seq.text_sent and text[safe - 1] == "\ufffd":  # an incomplete UTF-8 sequence: wait for more
            safe -= 1
        delta = text[seq.text_sent : safe] if safe > seq.text_sent else ""
        seq.text_sent += len(delta)
        seq.emit(self._chunk(seq, [token], [logprob], delta, None))

    def _finish(
        self, seq: _Seq, reason: FinishReason, ids: list[int], logprobs: list[float], text: str | None = None
    ) -> None:
        if text is None:
            text = self.detokenize(seq.generated) if reason != "abort" else ""
        delta = text[seq.text_sent :] if len(text) > seq.text_sent else ""
        self._retire(seq)
        seq.emit(self._chunk(seq, ids, logprobs, delta, reason))

    def _score_sync(self, p_ids: list[int], c_ids: list[int]) -> list[float]:
        import torch

        with torch.inference_mode(), self._compute:
            ids = torch.tensor([p_ids + c_ids], device=self._device)
            logits = self._model(input_ids=ids, use_cache=False).logits[0].float()
        logp = torch.log_softmax(logits[len(p_ids) - 1 : -1], dim=-1)
        target = torch.tensor(c_ids, device=logp.device)
        return [float(x) for x in logp.gather(1, target[:, None])[:, 0].cpu()]


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
