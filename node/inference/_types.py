"""Data crossing the engine boundary: sampling parameters, requests, streamed chunks, scores and stats.

All are frozen, slotted dataclasses validated on construction, so an engine never sees an out-of-range value and the
overlay can turn a bad client field into ``InvalidParams(param=..., value=...)`` before any work is queued.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from node.inference._errors import InvalidParams

#: Largest ``max_tokens`` a request may ask for (also bounds each request's chunk stream).
MAX_TOKENS_LIMIT = 4096
#: OpenAI allows at most four stop sequences.
MAX_STOP_STRINGS = 4
#: Longest single stop string, in characters.
MAX_STOP_CHARS = 64
#: Longest prompt accepted at the boundary, in characters or token ids; engines also check their context length.
MAX_PROMPT_LENGTH = 262_144
#: Largest seed (OpenAI seeds are 64-bit signed integers).
MAX_SEED = 2**63 - 1

FinishReason = Literal["stop", "length", "abort"]


def _check(ok: bool, param: str, value: object, reason: str) -> None:
    if not ok:
        raise InvalidParams(param=param, value=value, reason=reason)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingParams:
    """How to sample a completion; names and ranges follow OpenAI's completions API.

    ``temperature`` 0 means greedy decoding (deterministic, ``seed`` is then irrelevant).
    """

    #: Most tokens to generate, 1..4096.
    max_tokens: int = 16
    #: Softmax temperature, 0..2 (0 = greedy).
    temperature: float = 1.0
    #: Nucleus mass kept, in (0, 1].
    top_p: float = 1.0
    #: Keep only the k most likely tokens; 0 disables (not an OpenAI field, the common extension).
    top_k: int = 0
    #: Seed for reproducible sampling, 0..2**63-1, or None for fresh randomness.
    seed: int | None = None
    #: Up to four strings; generation stops before the first occurrence, which is not returned.
    stop: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        _check(_is_int(self.max_tokens), "max_tokens", self.max_tokens, "must be an integer")
        _check(
            1 <= self.max_tokens <= MAX_TOKENS_LIMIT, "max_tokens", self.max_tokens, f"must be 1..{MAX_TOKENS_LIMIT}"
        )
        _check(_is_number(self.temperature), "temperature", self.temperature, "must be a finite number")
        _check(0.0 <= self.temperature <= 2.0, "temperature", self.temperature, "must be in [0, 2]")
        _check(_is_number(self.top_p), "top_p", self.top_p, "must be a finite number")
        _check(0.0 < self.top_p <= 1.0, "top_p", self.top_p, "must be in (0, 1]")
        _check(_is_int(self.top_k) and self.top_k >= 0, "top_k", self.top_k, "must be an integer >= 0")
        if self.seed is not None:
            _check(_is_int(self.seed) and 0 <= self.seed <= MAX_SEED, "seed", self.seed, "must be in 0..2**63-1")
        stop: object = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        _check(isinstance(stop, (list, tuple)), "stop", stop, "must be a string or a list of strings")
        assert isinstance(stop, (list, tuple))
        _check(len(stop) <= MAX_STOP_STRINGS, "stop", len(stop), f"at most {MAX_STOP_STRINGS} stop strings")
        for item in stop:
            _check(isinstance(item, str) and 0 < len(item) <= MAX_STOP_CHARS, "stop", item, "1..64 characters each")
        object.__setattr__(self, "stop", tuple(stop))
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))

    @property
    def greedy(self) -> bool:
        """Whether decoding is greedy (temperature 0 or top_k 1)."""
        return self.temperature == 0.0 or self.top_k == 1


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationRequest:
    """One completion request. ``prompt`` is text (tokenized by the engine) or token ids (used as given)."""

    #: Caller-chosen id, unique among in-flight requests, 1..128 characters; used by ``abort``.
    request_id: str
    #: Prompt text, or a sequence of token ids (each >= 0); at most 262144 characters/ids.
    prompt: str | tuple[int, ...]
    #: Sampling parameters.
    params: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self) -> None:
        rid = self.request_id
        _check(isinstance(rid, str) and 0 < len(rid) <= 128, "request_id", rid, "1..128 characters")
        prompt: object = self.prompt
        if not isinstance(prompt, str):
            _check(isinstance(prompt, Sequence), "prompt", prompt, "must be text or a list of token ids")
            assert isinstance(prompt, Sequence)
            _check(all(_is_int(t) and t >= 0 for t in prompt), "prompt", None, "token ids must be integers >= 0")
            prompt = tuple(prompt)
            object.__setattr__(self, "prompt", prompt)
        assert isinstance(prompt, (str, tuple))
        _check(0 < len(prompt) <= MAX_PROMPT_LENGTH, "prompt", len(prompt), "must be non-empty and at most 262144 long")
        _check(isinstance(self.params, SamplingParams), "params", None, "must be SamplingParams")

    def __repr__(self) -> str:
        # Redacted: the prompt is private.
        return f"GenerationRequest(request_id={self.request_id!r}, prompt=<{len(self.prompt)}>, params={self.params!r})"


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationChunk:
    """One streamed delta of a completion. The last chunk of a stream has ``finish_reason`` set."""

    request_id: str
    #: New token ids in this delta (may be empty on the final chunk).
    token_ids: tuple[int, ...]
    #: Natural-log probability of each new token under the model's raw distribution (before temperature/top-k/p).
    logprobs: tuple[float, ...]
    #: New text in this delta (text can lag tokens while a stop string or a UTF-8 sequence is incomplete).
    text: str
    #: None while streaming; "stop" (stop string or end-of-sequence), "length" (max_tokens/context) or "abort".
    finish_reason: FinishReason | None
    #: Prompt length in tokens.
    prompt_tokens: int
    #: Completion tokens generated so far (cumulative).
    completion_tokens: int
    #: Prompt tokens whose KV came from the prefix cache instead of being computed (0..prompt_tokens).
    cached_tokens: int

    def __repr__(self) -> str:
        return (
            f"GenerationChunk(request_id={self.request_id!r}, tokens={len(self.token_ids)}, "
            f"finish_reason={self.finish_reason!r}, completion_tokens={self.completion_tokens}, "
            f"cached_tokens={self.cached_tokens})"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ScoreResult:
    """Teacher-forced log-probabilities of a completion given a prompt (what verifiers compare)."""

    #: The completion's token ids.
    token_ids: tuple[int, ...]
    #: Natural-log probability of each completion token given everything before it (each <= 0).
    logprobs: tuple[float, ...]
    #: Prompt length in tokens.
    prompt_tokens: int

    @property
    def total_logprob(self) -> float:
        """Sum of the per-token log-probabilities."""
        return math.fsum(self.logprobs)

    @property
    def perplexity(self) -> float:
        """exp(-mean log-prob); ``inf`` for an empty completion."""
        if not self.logprobs:
            return math.inf
        return math.exp(-self.total_logprob / len(self.logprobs))


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineStats:
    """A snapshot of an engine's load and cache, as advertised in heartbeats."""

    #: The served model's id (0x-prefixed keccak of ``name@revision``), or "" when unknown.
    model_id: str
    #: Requests waiting for admission.
    queued_requests: int
    #: Requests being decoded.
    running_requests: int
    #: Prompt tokens still to compute: queued requests' whole prompts plus the rest of prompts being prefilled (the
    #: prefill work ahead of a new request).
    queued_tokens: int
    #: Chained prefix-chunk hashes (8 bytes each) whose KV is cached, most recently used first; bounded.
    cached_prefix_hashes: tuple[bytes, ...]
    #: Bytes held by the prefix cache.
    cache_bytes: int
    #: Prompt tokens computed by prefill since start.
    prefill_tokens_computed: int
    #: Prompt tokens served from the prefix cache since start.
    prefill_tokens_cached: int
    #: Generated tokens per second over the recent window (0 when idle).
    tokens_per_second: float
    #: Tokens still to generate by queued and running generate requests (``max_tokens`` minus generated, summed):
    #: the decode work a new request will share its steps with. 0 when the engine does not know.
    decode_backlog_tokens: int = 0
    #: Seconds per generated token as this engine measured it: EWMA over recent steps of a batched decode forward's
    #: wall time divided by the sequences in it (its decode throughput cost per token; prefill is counted apart, in
    #: ``queued_tokens``). 0 until measured, or when the engine does not know.
    seconds_per_decode_token: float = 0.0
    #: Seconds per prompt token computed, as this engine measured it: a step's prefill forwards' wall time over the
    #: tokens they computed, each averaged over recent steps (so weighted by tokens). Lets a client know a slow node
    #: is slow before sending it anything. 0 until measured, or when the engine does not know.
    seconds_per_prefill_token: float = 0.0
