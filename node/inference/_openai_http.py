"""The ``openai-http`` engine: our ``Engine`` protocol in front of any OpenAI-compatible completions server.

Why: operators with GPUs already run ``trtllm-serve``, vLLM, SGLang or Ollama, often across several GPUs. Fronting
their ``/v1/completions`` lets such a deployment join the network unchanged (and gives TensorRT-LLM a server-based
path next to the in-process adapter). The node keeps its own model folder for the tokenizer and the model id; the
upstream must serve the same weights (the verifier catches it when it does not).

Mapping (the documented OpenAI completions API plus two widely implemented extensions, each optional):

* ``generate`` → ``POST /v1/completions`` with the prompt as token ids, ``stream=true``, ``logprobs=1``,
  ``stream_options.include_usage`` (for ``prompt_tokens_details.cached_tokens``, which vLLM reports with
  ``--enable-prompt-tokens-details``), ``top_k`` and ``seed``, and vLLM's ``return_tokens_as_token_ids`` (tokens come
  back as ``"token_id:N"``). A server that ignores the extension returns token strings; their ids are then found by
  re-tokenizing the text with the local tokenizer (documented as approximate). Server-Sent Events are parsed line by
  line with a bound on the line length.
* ``score`` → ``echo=true, logprobs=1, max_tokens=1`` on prompt + completion: ``token_logprobs`` of the echoed
  completion positions are the teacher-forced log-probs (the first echoed position has none, which is why the prompt
  must be non-empty).
* Errors: HTTP 429/503 → ``EngineOverloaded``; other 4xx → ``InvalidParams`` (the upstream's message is not repeated:
  it may quote the prompt); 5xx or a malformed stream → ``InferenceError``; unreachable → ``EngineUnavailable``;
  no data within ``chunk_timeout_s`` → ``EngineTimeout``. Closing a stream early closes its HTTP response, which
  servers treat as an abort.

aiohttp is imported inside the methods that use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic_core import from_json

from node.inference._errors import (
    EngineClosed,
    EngineOverloaded,
    EngineTimeout,
    EngineUnavailable,
    InferenceError,
    InvalidParams,
)
from node.inference._prefix import chunk_hashes
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
    import aiohttp
    from transformers import PreTrainedTokenizerFast

    from node.inference._modelio import ModelInfo
    from node.inference._torch_engine import EngineConfig

ENGINE_NAME = "openai-http"
#: Longest Server-Sent Events line accepted from the upstream, bytes.
MAX_EVENT_BYTES = 1 << 20
#: Most bytes of one non-streamed upstream answer (``/v1/models``, a score's echoed log-probs: a few hundred bytes per
#: token of the longest prompt): an upstream that answers without end must not make the node hold it all.
MAX_REPLY_BYTES = 16 << 20
#: Prompt chunk hashes remembered for the heartbeat summary (the upstream does not expose its cache).
_HASH_MEMORY = 4096
_TOKEN_ID_PREFIX = "token_id:"
_FINISH: Mapping[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "abort", "eos": "stop"}


def completion_body(model: str, prompt: Sequence[int], params: SamplingParams, *, stream: bool) -> dict[str, Any]:
    """The ``/v1/completions`` body for ``params``: OpenAI names plus ``top_k`` and ``return_tokens_as_token_ids``."""
    body: dict[str, Any] = {
        "model": model,
        "prompt": list(prompt),
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "logprobs": 1,
        "return_tokens_as_token_ids": True,
        "stream": stream,
    }
    if params.top_k > 0:
        body["top_k"] = params.top_k
    if params.seed is not None:
        body["seed"] = params.seed
    if params.stop:
        body["stop"] = list(params.stop)
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def token_id(token: str) -> int | None:
    """The id in a ``"token_id:N"`` token string (vLLM's ``return_tokens_as_token_ids``), else None."""
    if token.startswith(_TOKEN_ID_PREFIX):
        with contextlib.suppress(ValueError):
            return int(token[len(_TOKEN_ID_PREFIX) :])
    return None


def cached_tokens_of(usage: object) -> int:
    """``usage.prompt_tokens_details.cached_tokens`` where the server reports it, else 0."""
    if isinstance(usage, Mapping):
        details = usage.get("prompt_tokens_details")
        if isinstance(details, Mapping):
            value = details.get("cached_tokens")
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                return value
    return 0


class OpenAIHttpEngine:
    """``Engine`` over an OpenAI-compatible server at ``base_url`` (e.g. ``http://127.0.0.1:8000/v1``)."""

    def __init__(
        self,
        base_url: str,
        tokenizer: PreTrainedTokenizerFast,
        *,
        info: ModelInfo | None,
        upstream_model: str | None = None,
        max_in_flight: int = 64,
        chunk_timeout_s: float = 120.0,
    ) -> None:
        self._base = base_url.rstrip("/")
        if not self._base.endswith("/v1"):
            self._base += "/v1"
        self._tok = tokenizer
        self._info = info
        self._upstream_model = upstream_model
        self._max_in_flight = max_in_flight
        self._timeout = chunk_timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._in_flight: set[str] = set()
        self._aborted: set[str] = set()
        self._hashes: OrderedDict[bytes, None] = OrderedDict()
        self._recent: deque[tuple[float, int]] = deque(maxlen=4096)
        self._closed = False

    @classmethod
    def from_folder(
        cls, path: str | Path, upstream: str, config: EngineConfig | None = None, *, upstream_model: str | None = None
    ) -> OpenAIHttpEngine:
        """Front ``upstream`` for the model in ``path`` (its tokenizer and id; the weights stay unused)."""
        from node.inference._modelio import check_folder, load_tokenizer, read_info
        from node.inference._torch_engine import EngineConfig

        cfg = config or EngineConfig()
        if not upstream.startswith(("http://", "https://")):
            raise InvalidParams(param="upstream", value=None, reason="an http:// or https:// URL")
        folder = Path(path)
        check_folder(folder)
        return cls(
            upstream,
            load_tokenizer(folder),
            info=read_info(folder),
            upstream_model=upstream_model,
            max_in_flight=cfg.max_queue + cfg.max_running,
            chunk_timeout_s=cfg.chunk_timeout_s,
        )

    # ------------------------------------------------------------------------------------------------- public API
    @property
    def model_id(self) -> ModelId:
        """The served model's id, ``ModelId.ZERO`` when the folder had no metadata."""
        return self._info.model_id if self._info else ModelId.ZERO

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        """Stream ``/v1/completions`` as delta chunks."""
        self._admit(request.request_id)
        try:
            prompt = await self._ids(request.prompt)
            await asyncio.to_thread(self._remember, prompt)
            model = await self._model_name()
            body = completion_body(model, prompt, request.params, stream=True)
            sent = 0
            cached = 0
            final: GenerationChunk | None = None
            async for event in self._stream(body, request.request_id):
                if "usage" in event and event.get("usage"):
                    cached = cached_tokens_of(event["usage"])
                choices = event.get("choices") or []
                if not choices:
                    continue
                choice = choices[0]
                text = str(choice.get("text") or "")
                ids, lps = self._tokens_of(choice.get("logprobs"), text)
                reason_raw = choice.get("finish_reason")
                reason = None if reason_raw is None else _FINISH.get(str(reason_raw), "stop")
                if not ids and not text and reason is None:
                    continue
                sent += len(ids)
                self._recent.append((time.monotonic(), len(ids)))
                chunk = GenerationChunk(
                    request_id=request.request_id,
                    token_ids=tuple(ids),
                    logprobs=tuple(lps),
                    text=text,
                    finish_reason=reason,
                    prompt_tokens=len(prompt),
                    completion_tokens=sent,
                    cached_tokens=min(cached, len(prompt)),
                )
                if reason is not None:
                    # Servers send usage after the finishing choice; it only changes cached_tokens, which the
                    # final chunk must carry, so hold the final chunk until the stream ends.
                    final = chunk
                    continue
                yield chunk
            if request.request_id in self._aborted:
                yield GenerationChunk(
                    request_id=request.request_id,
                    token_ids=(),
                    logprobs=(),
                    text="",
                    finish_reason="abort",
                    prompt_tokens=len(prompt),
                    completion_tokens=sent,
                    cached_tokens=min(cached, len(prompt)),
                )
                return
            if final is None:
                raise InferenceError("the upstream stream ended without a finish reason")
            yield GenerationChunk(
                request_id=final.request_id,
                token_ids=final.token_ids,
                logprobs=final.logprobs,
                text=final.text,
                finish_reason=final.finish_reason,
                prompt_tokens=final.prompt_tokens,
                completion_tokens=final.completion_tokens,
                cached_tokens=min(cached, len(prompt)),
            )
        finally:
            self._in_flight.discard(request.request_id)
            self._aborted.discard(request.request_id)

    async def score(self, prompt: str | Sequence[int], completion: str | Sequence[int]) -> ScoreResult:
        """Teacher-forced log-probs via ``echo`` + ``logprobs`` on prompt + completion."""
        p_ids = await self._ids(prompt if isinstance(prompt, str) else tuple(prompt))
        c_ids = await self._ids(completion if isinstance(completion, str) else tuple(completion), allow_empty=True)
        if not c_ids:
            return ScoreResult(token_ids=(), logprobs=(), prompt_tokens=len(p_ids))
        rid = f"score-{id(c_ids)}-{time.monotonic_ns()}"
        self._admit(rid)
        try:
            model = await self._model_name()
            body = completion_body(model, p_ids + c_ids, SamplingParams(max_tokens=1, temperature=0), stream=False)
            body["echo"] = True
            reply = await self._post(body)
            try:
                logprobs = reply["choices"][0]["logprobs"]
                values = logprobs["token_logprobs"][len(p_ids) : len(p_ids) + len(c_ids)]
                out = tuple(float(v) for v in values)
            except (KeyError, IndexError, TypeError, ValueError) as exc:
                raise InferenceError("the upstream returned no prompt log-probs for scoring") from exc
            if len(out) != len(c_ids):
                raise InferenceError("the upstream returned too few prompt log-probs for scoring")
            return ScoreResult(token_ids=tuple(c_ids), logprobs=out, prompt_tokens=len(p_ids))
        finally:
            self._in_flight.discard(rid)

    def stats(self) -> EngineStats:
        """In-flight requests; cached hashes approximate the upstream's cache by recently served prompts."""
        now = time.monotonic()
        window = [(t, n) for t, n in self._recent if now - t <= 10.0]
        tps = sum(n for _, n in window) / max(now - window[0][0], 1e-3) if window else 0.0
        return EngineStats(
            model_id=self.model_id,
            queued_requests=0,
            running_requests=len(self._in_flight),
            queued_tokens=0,
            cached_prefix_hashes=tuple(reversed(self._hashes)),
            cache_bytes=0,
            prefill_tokens_computed=0,
            prefill_tokens_cached=0,
            tokens_per_second=tps,
        )

    async def abort(self, request_id: str) -> bool:
        """Close the request's HTTP stream (the upstream aborts on disconnect); its stream ends with "abort"."""
        if request_id not in self._in_flight:
            return False
        self._aborted.add(request_id)
        return True

    async def check_health(self) -> bool:
        """True while open and the upstream answers ``GET /v1/models`` within 5 s."""
        if self._closed:
            return False
        import aiohttp

        try:
            async with self._client().get(self._base + "/models", timeout=aiohttp.ClientTimeout(total=5)) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def close(self) -> None:
        """Stop accepting work and close the HTTP session. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._aborted.update(self._in_flight)
        if self._session is not None:
            await self._session.close()

    # -------------------------------------------------------------------------------------------------- helpers
    def _admit(self, request_id: str) -> None:
        if self._closed:
            raise EngineClosed()
        if request_id in self._in_flight:
            raise InvalidParams(param="request_id", value=request_id, reason="already in flight")
        if len(self._in_flight) >= self._max_in_flight:
            raise EngineOverloaded(queued=len(self._in_flight), limit=self._max_in_flight)
        self._in_flight.add(request_id)

    def _client(self) -> aiohttp.ClientSession:
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self._timeout),
                connector=aiohttp.TCPConnector(limit=self._max_in_flight),
            )
        return self._session

    async def _ids(self, prompt: str | tuple[int, ...], *, allow_empty: bool = False) -> list[int]:
        if isinstance(prompt, str):
            ids = await asyncio.to_thread(self._tok.encode, prompt, add_special_tokens=False)
        else:
            ids = list(prompt)
        if not ids and not allow_empty:
            raise InvalidParams(param="prompt", value=0, reason="tokenizes to nothing")
        return list(ids)

    async def _model_name(self) -> str:
        """The upstream's model name: the configured one, else the first of ``GET /v1/models``."""
        if self._upstream_model is not None:
            return self._upstream_model
        import aiohttp

        try:
            async with self._client().get(self._base + "/models", timeout=aiohttp.ClientTimeout(total=10)) as resp:
                data = await _read_json(resp)
            name = data["data"][0]["id"]
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise EngineUnavailable(engine=ENGINE_NAME, reason=f"upstream unreachable ({type(exc).__name__})") from exc
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise InferenceError("the upstream's /v1/models lists no model") from exc
        if not isinstance(name, str):
            raise InferenceError("the upstream's /v1/models lists no model")
        self._upstream_model = name
        return name

    def _tokens_of(self, logprobs: object, text: str) -> tuple[list[int], list[float]]:
        """Token ids and their log-probs from one choice's ``logprobs`` (ids re-derived from text if not given)."""
        if not isinstance(logprobs, Mapping):
            ids = list(self._tok.encode(text, add_special_tokens=False)) if text else []
            return ids, [float("nan")] * len(ids)
        tokens = [str(t) for t in (logprobs.get("tokens") or [])]
        values = [float("nan") if v is None else float(v) for v in (logprobs.get("token_logprobs") or [])]
        parsed = [token_id(t) for t in tokens]
        if tokens and all(p is not None for p in parsed):
            return [p for p in parsed if p is not None], values[: len(tokens)]
        ids = list(self._tok.encode("".join(tokens), add_special_tokens=False)) if tokens else []
        if len(ids) == len(values):
            return ids, values
        return ids, [float("nan")] * len(ids)

    async def _stream(self, body: dict[str, Any], request_id: str) -> AsyncIterator[dict[str, Any]]:
        """Parsed Server-Sent Events of a streaming completion, until ``[DONE]`` or an abort."""
        import aiohttp

        try:
            data = await asyncio.to_thread(json.dumps, body)  # a long prompt's ids: keep the loop free
            async with self._client().post(
                self._base + "/completions", data=data, headers={"Content-Type": "application/json"}
            ) as resp:
                if resp.status != 200:
                    await self._raise_for(resp)
                while True:
                    if request_id in self._aborted:
                        return
                    try:
                        line = await asyncio.wait_for(resp.content.readline(), timeout=self._timeout)
                    except TimeoutError as exc:
                        raise EngineTimeout(seconds=self._timeout) from exc
                    if not line:
                        return
                    if len(line) > MAX_EVENT_BYTES:
                        raise InferenceError("the upstream sent an oversized event")
                    line = line.strip()
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        return
                    try:
                        # pydantic_core's parser stops at 200 levels; json.loads recurses on the C stack up to the
                        # recursion limit (py_ecc, loaded with web3, sets 100,000): a deep event crashed the node.
                        event = from_json(payload)
                    except ValueError as exc:
                        raise InferenceError("the upstream sent an event that is not JSON") from exc
                    if isinstance(event, dict) and "error" in event:
                        raise InferenceError("the upstream reported an error mid-stream")
                    if isinstance(event, dict):
                        yield event
        except aiohttp.ClientConnectionError as exc:
            raise EngineUnavailable(engine=ENGINE_NAME, reason=f"upstream unreachable ({type(exc).__name__})") from exc
        except aiohttp.ClientError as exc:
            raise InferenceError(f"upstream request failed ({type(exc).__name__})") from exc

    async def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        import aiohttp

        try:
            payload = await asyncio.to_thread(json.dumps, body)
            async with self._client().post(
                self._base + "/completions",
                data=payload,
                headers={"Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=self._timeout),
            ) as resp:
                if resp.status != 200:
                    await self._raise_for(resp)
                data = await _read_json(resp)
        except TimeoutError as exc:
            raise EngineTimeout(seconds=self._timeout) from exc
        except aiohttp.ClientConnectionError as exc:
            raise EngineUnavailable(engine=ENGINE_NAME, reason=f"upstream unreachable ({type(exc).__name__})") from exc
        except aiohttp.ClientError as exc:
            raise InferenceError(f"upstream request failed ({type(exc).__name__})") from exc
        except ValueError as exc:
            raise InferenceError("the upstream's reply is not JSON") from exc
        if not isinstance(data, dict):
            raise InferenceError("the upstream's reply is not a JSON object")
        return data

    async def _raise_for(self, resp: aiohttp.ClientResponse) -> None:
        """Map a non-200 reply onto our error tree (its body is read for ``param`` only, never echoed)."""
        param = "request"
        with contextlib.suppress(Exception):
            data = from_json((await resp.content.read(65536)) or b"{}")
            error = data.get("error") if isinstance(data, dict) else None
            if isinstance(error, dict) and isinstance(error.get("param"), str) and len(error["param"]) <= 64:
                param = error["param"]
        if resp.status in (429, 503):
            raise EngineOverloaded(queued=len(self._in_flight), limit=self._max_in_flight)
        if 400 <= resp.status < 500:
            raise InvalidParams(
                param=param, value=None, reason=f"the upstream rejected the request (HTTP {resp.status})"
            )
        raise InferenceError(f"the upstream failed (HTTP {resp.status})")

    def _remember(self, prompt: list[int]) -> None:
        # Runs in a worker thread; the OrderedDict is only touched here and read by ``stats`` (a snapshot via
        # ``tuple(reversed(...))``), and CPython's GIL keeps each single operation atomic.
        for h in chunk_hashes(prompt):
            self._hashes[h] = None
            self._hashes.move_to_end(h)
        while len(self._hashes) > _HASH_MEMORY:
            self._hashes.popitem(last=False)


async def _read_json(resp: aiohttp.ClientResponse) -> Any:
    """The answer's body parsed as JSON (pydantic's parser: nesting bounded), read to at most ``MAX_REPLY_BYTES``;
    :class:`InferenceError` past it."""
    limit = MAX_REPLY_BYTES
    body = b""
    while len(body) <= limit and (part := await resp.content.read(limit + 1 - len(body))):
        body += part
    if len(body) > limit:
        raise InferenceError(f"the upstream's answer is over {limit} bytes")
    return from_json(body)
