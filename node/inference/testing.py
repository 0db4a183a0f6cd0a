"""A small OpenAI-compatible server in front of any ``Engine``, for tests and benchmarks of the ``openai-http`` engine.

Published as a testing module (as aiohttp publishes ``aiohttp.test_utils``) so tests, benchmarks and demos do not
import a harness privately. It implements the part of ``/v1/completions`` that vLLM serves and the ``openai-http``
engine uses: token-id or text prompts, ``stream`` with Server-Sent Events and ``stream_options.include_usage``,
``logprobs`` (sampled token only), ``echo`` (prompt log-probs, the first one null), vLLM's
``return_tokens_as_token_ids``, ``usage.prompt_tokens_details.cached_tokens``, and errors in the OpenAI shape
(400 with ``param``, 429 when the engine is overloaded). It is not a production server: no auth, one model.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiohttp import web

# Deliberately dishonest engines for verifier tests and the demo, published here so nobody imports them privately.
from node.inference._cheats import CHEAT_MODES as CHEAT_MODES
from node.inference._cheats import CheatConfig as CheatConfig
from node.inference._cheats import CheatingEngine as CheatingEngine
from node.inference._engine import Engine
from node.inference._errors import EngineOverloaded, InferenceError, InvalidParams
from node.inference._types import GenerationChunk, GenerationRequest, SamplingParams

_ENGINE = web.AppKey("engine", Engine)
_MODEL = web.AppKey("model", str)
_TOKENIZE = web.AppKey("tokenize", object)


def openai_app(engine: Engine, *, model: str, tokenizer: Any) -> web.Application:
    """An app serving ``engine`` as ``model`` at ``/v1``; ``tokenizer`` renders tokens as text (``decode``)."""
    app = web.Application(client_max_size=4 * 1024 * 1024)
    app[_ENGINE] = engine
    app[_MODEL] = model
    app[_TOKENIZE] = tokenizer
    app.router.add_get("/v1/models", _models)
    app.router.add_post("/v1/completions", _completions)
    return app


def _error(status: int, message: str, param: str | None, code: str) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}
    return web.json_response(body, status=status)


async def _models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": request.app[_MODEL], "object": "model"}]})


def _token_text(tokenizer: Any, token: int, as_ids: bool) -> str:
    return f"token_id:{token}" if as_ids else str(tokenizer.decode([token]))


async def _completions(request: web.Request) -> web.StreamResponse:
    engine = request.app[_ENGINE]
    try:
        body = await asyncio.to_thread(json.loads, await request.read())
        prompt = body["prompt"]
        if isinstance(prompt, list):
            prompt = await asyncio.to_thread(tuple, prompt)
        stop = body.get("stop") or ()
        params = SamplingParams(
            max_tokens=int(body.get("max_tokens", 16)),
            temperature=float(body.get("temperature", 1.0)),
            top_p=float(body.get("top_p", 1.0)),
            top_k=max(0, int(body.get("top_k", 0) or 0)),
            seed=body.get("seed"),
            stop=(stop,) if isinstance(stop, str) else tuple(stop),
        )
        stream = bool(body.get("stream", False))
        echo = bool(body.get("echo", False))
        as_ids = bool(body.get("return_tokens_as_token_ids", False))
        want_logprobs = body.get("logprobs") is not None
        if body.get("model") != request.app[_MODEL]:
            return _error(404, "model not found", "model", "model_not_found")
    except InvalidParams as exc:
        return _error(400, str(exc), exc.param, exc.code)
    except (KeyError, TypeError, ValueError):
        return _error(400, "malformed request", None, "invalid_request")
    generation = GenerationRequest(request_id=secrets.token_hex(8), prompt=prompt, params=params)
    stream_iter = engine.generate(generation)
    try:
        first = await anext(stream_iter)
    except EngineOverloaded:
        return _error(429, "engine overloaded", None, "overloaded")
    except InvalidParams as exc:
        return _error(400, str(exc), exc.param, exc.code)
    except InferenceError as exc:
        return _error(500, "engine failed", None, exc.code)
    try:
        return await _reply(
            request,
            body,
            prompt,
            first,
            stream_iter,
            stream=stream,
            echo=echo,
            as_ids=as_ids,
            want_logprobs=want_logprobs,
        )
    except EngineOverloaded:  # the echo path's score call queues too
        return _error(429, "engine overloaded", None, "overloaded")
    except InferenceError as exc:
        return _error(500, "engine failed", None, exc.code)
    finally:
        await stream_iter.aclose()  # a client that went away aborts the engine request


async def _reply(
    request: web.Request,
    body: dict[str, Any],
    prompt: str | tuple[int, ...],
    first: GenerationChunk,
    stream_iter: Any,
    *,
    stream: bool,
    echo: bool,
    as_ids: bool,
    want_logprobs: bool,
) -> web.StreamResponse:
    engine = request.app[_ENGINE]
    tokenizer: Any = request.app[_TOKENIZE]
    cid = "cmpl-" + secrets.token_hex(6)
    if stream:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        chunk: GenerationChunk | None = first
        last = first
        while chunk is not None:
            last = chunk
            choice: dict[str, Any] = {"index": 0, "text": chunk.text, "finish_reason": chunk.finish_reason}
            if want_logprobs:
                choice["logprobs"] = {
                    "tokens": [_token_text(tokenizer, t, as_ids) for t in chunk.token_ids],
                    "token_logprobs": list(chunk.logprobs),
                }
            await response.write(b"data: " + json.dumps({"id": cid, "choices": [choice]}).encode() + b"\n\n")
            chunk = None if chunk.finish_reason is not None else await anext(stream_iter, None)
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = _usage(last)
            await response.write(b"data: " + json.dumps({"id": cid, "choices": [], "usage": usage}).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
    chunks = [first]
    while chunks[-1].finish_reason is None:
        chunks.append(await anext(stream_iter))
    ids = [t for c in chunks for t in c.token_ids]
    lps = [lp for c in chunks for lp in c.logprobs]
    text = "".join(c.text for c in chunks)
    tokens: list[str] = []
    token_lps: list[float | None] = []
    if echo:
        prompt_ids = list(prompt) if isinstance(prompt, tuple) else list(tokenizer.encode(prompt))
        scored = await engine.score(prompt_ids[:1], prompt_ids[1:]) if len(prompt_ids) > 1 else None
        tokens += [_token_text(tokenizer, t, as_ids) for t in prompt_ids]
        token_lps += [None, *(scored.logprobs if scored else ())]
        text = _decode(tokenizer, prompt_ids) + text
    tokens += [_token_text(tokenizer, t, as_ids) for t in ids]
    token_lps += lps
    choice = {"index": 0, "text": text, "finish_reason": chunks[-1].finish_reason}
    if want_logprobs:
        choice["logprobs"] = {"tokens": tokens, "token_logprobs": token_lps}
    return web.json_response({"id": cid, "object": "text_completion", "choices": [choice], "usage": _usage(chunks[-1])})


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return str(tokenizer.decode(list(ids)))


def _usage(last: GenerationChunk) -> dict[str, Any]:
    return {
        "prompt_tokens": last.prompt_tokens,
        "completion_tokens": last.completion_tokens,
        "total_tokens": last.prompt_tokens + last.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": last.cached_tokens},
    }


class ThreadedServer:
    """An aiohttp app served on 127.0.0.1 from its own thread and event loop, like a separate server process.

    ``make_app`` runs inside that loop (so an engine it starts lives there too); ``on_stop`` (optional) is awaited
    there after the server stops. Use as a context manager; ``url`` is ``http://127.0.0.1:PORT``.
    """

    def __init__(
        self,
        make_app: Callable[[], Awaitable[web.Application]],
        *,
        on_stop: Callable[[], Awaitable[None]] | None = None,
        start_timeout_s: float = 60.0,
    ) -> None:
        self._make_app = make_app
        self._on_stop = on_stop
        self._timeout = start_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="openai-test-server", daemon=True)
        self.url = ""

    def __enter__(self) -> ThreadedServer:
        self._thread.start()
        if not self._ready.wait(self._timeout):
            raise TimeoutError("the test server did not start")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        self._thread.join(self._timeout)

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            app = await self._make_app()
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            self.url = f"http://127.0.0.1:{port}"
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()
            if self._on_stop is not None:
                await self._on_stop()
