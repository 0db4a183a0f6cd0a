"""``create_openai_app(service, config)``: an OpenAI-compatible HTTP endpoint in front of the private network.

Routes on the ``/v1`` sub-app: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``, with
``stream: true`` as server-sent events ending in ``data: [DONE]``. Every request goes through the
:class:`~node.client.CompletionService` (the ``Client``: S-IDA cloves over onion paths), so a tool that speaks
OpenAI's API uses PlanetServe by changing only its base URL.

Errors before the first token are ordinary HTTP errors in OpenAI's shape; an error after a stream started is one
``data: {"error": ...}`` event (which the official ``openai`` package raises as ``APIError``) and the stream ends.
The endpoint is meant for 127.0.0.1: without a bearer key (``OpenAIConfig.api_key``) it answers only requests that
name a loopback host (``Host``, and ``Origin`` when a browser sends one), so that a web page the user visits cannot
spend the user's wallet through it (a cross-site POST, or DNS rebinding of the page's own name to 127.0.0.1); with a
key it may be shared. Bodies must arrive within ``body_timeout_s`` and request heads within ``header_timeout_s``, and
a streamed answer that its caller stops reading ends at the whole-request deadline: no caller can hold one of the
``max_concurrent`` slots longer than that.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import hdrs, web
from pydantic import ValidationError
from pydantic_core import from_json
from yarl import URL

from node.client._bill import Bill, billing
from node.client._chat import CHAT_STOP, ChatMessage, render_chat
from node.client._deadline import with_deadline
from node.client._errors import render
from node.client._openai_wire import (
    MAX_PROMPT_CHARS,
    ChatCompletionsRequest,
    CompletionsRequest,
    error_body,
    usage,
)
from node.client._service import CompletionService, ServedModel
from node.inference import InvalidParams
from node.overlay import CompletionDelta, CompletionRequest

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenAIConfig:
    """Limits and defaults of the endpoint."""

    max_body_bytes: int = 1 << 20
    """Largest request body, bytes (a 64 Ki-character prompt as JSON fits with room)."""
    max_concurrent: int = 64
    """Requests in flight at once; more get ``429`` at once rather than queueing without bound."""
    request_timeout_s: float = 300.0
    """Whole-request deadline, seconds (a stream that stalls longer ends with an error event; one whose caller stops
    reading is cut off at it)."""
    body_timeout_s: float = 10.0
    """Most seconds a caller may take to send its whole body (``408`` after): one that trickles a byte at a time
    must not hold an in-flight slot."""
    header_timeout_s: float = 20.0
    """Most seconds a connection may take to send a request head, and may stay idle between requests; it is then
    closed (aiohttp's default would keep it an hour)."""
    loopback_hosts: frozenset[str] = frozenset({"127.0.0.1", "localhost", "::1"})
    """Host names a keyless endpoint answers (in ``Host``, and in ``Origin`` when present): anything else is refused
    with ``403``. A browser puts the page's own name in both, so a page cannot use the user's endpoint (and wallet);
    set ``api_key`` to serve under other names."""
    default_max_tokens: int = 16
    """``max_tokens`` when the caller gives none (OpenAI's completions default)."""
    api_key: str | None = field(default=None, repr=False)
    """When set, callers must send ``Authorization: Bearer <key>``."""
    created: int = field(default_factory=lambda: int(time.time()))
    """``created`` of every model in ``/v1/models`` (the endpoint's start)."""


SERVICE = web.AppKey("planetserve.client.service", CompletionService)
CONFIG = web.AppKey("planetserve.client.openai_config", OpenAIConfig)
SLOTS = web.AppKey("planetserve.client.slots", asyncio.Semaphore)

#: aiohttp's header limits, set explicitly: OpenAI clients send a few short headers.
_MAX_LINE_SIZE = 8190
_MAX_FIELD_SIZE = 8190
#: Content types a web page may POST cross-site without a CORS preflight (plus none at all): never JSON from an API
#: client, refused so that a form or a ``fetch`` with a text body can never start a paid request.
_BROWSER_SIMPLE_TYPES = frozenset({"text/plain", "application/x-www-form-urlencoded", "multipart/form-data"})


def _json_error(status: int, message: str, *, error_type: str, code: str, param: str | None = None) -> web.Response:
    return web.json_response(error_body(message, error_type=error_type, code=code, param=param), status=status)


def _loopback_caller(request: web.Request, hosts: frozenset[str]) -> bool:
    """Whether the request names only loopback hosts: its ``Host``, and its ``Origin`` if it has one."""
    try:
        if request.url.host not in hosts:
            return False
        origin = request.headers.get(hdrs.ORIGIN)
        return origin is None or URL(origin).host in hosts
    except ValueError:  # a malformed Host or Origin
        return False


def _render_exception(exc: BaseException) -> web.Response:
    shown = render(exc)
    # A domain error's text is written for users and carries no prompt data; anything else stays in our logs.
    message = str(exc) if shown.status < 500 or shown.code != "internal_error" else "internal error"
    return _json_error(shown.status, message, error_type=shown.error_type, code=shown.code, param=shown.param)


@web.middleware
async def _limits(request: web.Request, handler: Handler) -> web.StreamResponse:
    """First: authentication and the in-flight bound, before any body is read."""
    config = request.app[CONFIG]
    if config.api_key is not None:
        sent = request.headers.get("Authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {config.api_key}".encode()):
            return _json_error(
                401, "missing or wrong API key", error_type="authentication_error", code="invalid_api_key"
            )
    elif not _loopback_caller(request, config.loopback_hosts):
        return _json_error(
            403,
            "this endpoint answers only requests to 127.0.0.1; set an API key to serve other names",
            error_type="permission_error",
            code="host_not_allowed",
        )
    slots = request.app[SLOTS]
    if slots.locked():
        return _json_error(
            429, "too many requests in flight; retry shortly", error_type="rate_limit_error", code="busy"
        )
    async with slots:
        return await handler(request)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Second: every error becomes OpenAI's error object; nothing leaks a traceback or request data."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 408: "request_timeout", 413: "request_too_large", 415: "unsupported_media_type"}.get(
            exc.status, "http_error"
        )
        return _json_error(exc.status, exc.reason, error_type="invalid_request_error", code=code)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:
        if render(exc).code == "internal_error":
            log.exception("openai endpoint: unexpected error")
        return _render_exception(exc)


async def _read_json(request: web.Request) -> Any:
    """The body as JSON, read within ``body_timeout_s`` (and ``max_body_bytes``, by aiohttp)."""
    if hdrs.CONTENT_TYPE not in request.headers or request.content_type in _BROWSER_SIMPLE_TYPES:
        raise web.HTTPUnsupportedMediaType(reason="send the body as application/json")
    try:
        async with asyncio.timeout(request.app[CONFIG].body_timeout_s):
            body = await request.read()
    except TimeoutError as exc:
        raise web.HTTPRequestTimeout(reason="the body did not arrive in time") from exc
    try:
        # pydantic's parser, not json.loads: it refuses nesting past 200 levels, while the standard library recurses
        # on the C stack up to sys.getrecursionlimit(), which py_ecc (imported with web3) raises to 100,000, so a
        # 1 MiB body of "[" would crash the whole process.
        return from_json(body.decode(request.charset or "utf-8"), allow_inf_nan=False)
    except (ValueError, LookupError) as exc:  # not the charset it says (or an unknown one), or not JSON
        raise InvalidParams(param="body", value=None, reason="the body is not JSON") from exc


def _validation_error(exc: ValidationError) -> InvalidParams:
    first = exc.errors(include_url=False, include_input=False)[0]
    param = ".".join(str(p) for p in first["loc"]) or "body"
    return InvalidParams(param=param, value=None, reason=str(first["msg"]))


def _completion_request(
    served: ServedModel,
    prompt: str,
    *,
    max_tokens: int,
    req: CompletionsRequest | ChatCompletionsRequest,
    stop: tuple[str, ...],
) -> CompletionRequest:
    try:
        return CompletionRequest(
            model=served.model_id,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            # Every request carries a seed so that a sampled answer can be replayed by a verifier (docs/openai.md).
            seed=req.seed if req.seed is not None else secrets.randbelow(2**63),
            stop=stop,
        )
    except ValidationError as exc:  # what the overlay refuses is the caller's fault too, never a 500
        raise _validation_error(exc) from exc


@dataclass(slots=True)
class _Tally:
    """What a finished generation amounted to."""

    text: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str | None = None
    bill: Bill = field(default_factory=Bill)
    """What the wallet counted for this request (read once the stream is over: the client settles at its end)."""

    def add(self, delta: CompletionDelta) -> None:
        self.text.append(delta.text)
        self.prompt_tokens = delta.prompt_tokens
        self.completion_tokens = delta.completion_tokens
        self.cached_tokens = delta.cached_tokens
        if delta.finish_reason is not None:
            if delta.finish_reason == "abort":
                raise _Aborted
            self.finish_reason = delta.finish_reason

    def usage(self) -> dict[str, Any]:
        return usage(
            self.prompt_tokens,
            self.completion_tokens,
            self.cached_tokens,
            cost_wei=self.bill.cost_wei,
            price_per_1k_tokens=self.bill.price_per_1k_tokens,
        )


class _Aborted(Exception):
    """The model node aborted the generation (shown to the caller as a server error)."""


class _CallerStalled(Exception):
    """The caller stopped reading a streamed answer until the whole-request deadline: its connection is cut."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("the caller stopped reading")
        self.response = response


class _Exchange:
    """One request's generation, shaped as a completion or a chat completion."""

    def __init__(self, *, chat: bool, served: ServedModel, request: CompletionRequest, config: OpenAIConfig) -> None:
        self.chat = chat
        self.served = served
        self.request = request
        self.config = config
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.served.name, "choices": choices}

    def body(self, tally: _Tally) -> dict[str, Any]:
        text = "".join(tally.text)
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": tally.finish_reason,
                "logprobs": None,
            }
            data = self._envelope("chat.completion", [choice])
        else:
            choice = {"index": 0, "text": text, "finish_reason": tally.finish_reason, "logprobs": None}
            data = self._envelope("text_completion", [choice])
        data["usage"] = tally.usage()
        return data

    def chunk(self, text: str, finish_reason: str | None, *, first: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"content": text} if text or first else {}
            if first:
                delta["role"] = "assistant"
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            return self._envelope("chat.completion.chunk", [choice])
        return self._envelope("text_completion", [{"index": 0, "text": text, "finish_reason": finish_reason}])

    def usage_chunk(self, tally: _Tally) -> dict[str, Any]:
        data = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        data["usage"] = tally.usage()
        return data


async def _respond(
    http: web.Request, exchange: _Exchange, service: CompletionService, *, stream: bool, include_usage: bool
) -> web.StreamResponse:
    with billing() as bill:
        tally = _Tally(bill=bill)
        return await _respond_billed(http, exchange, service, tally, stream=stream, include_usage=include_usage)


async def _respond_billed(
    http: web.Request,
    exchange: _Exchange,
    service: CompletionService,
    tally: _Tally,
    *,
    stream: bool,
    include_usage: bool,
) -> web.StreamResponse:
    end = asyncio.get_running_loop().time() + exchange.config.request_timeout_s
    deltas = with_deadline(service.stream(exchange.request), exchange.config.request_timeout_s)
    try:
        if not stream:
            async for delta in deltas:
                tally.add(delta)
            if tally.finish_reason is None:
                raise _Aborted
            return web.json_response(exchange.body(tally))
        # The first delta comes before the 200: an error that early is an ordinary HTTP error.
        try:
            first = await anext(deltas)
        except StopAsyncIteration as exc:
            raise _Aborted from exc
        tally.add(first)
        response = web.StreamResponse(
            status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(http)

        async def send(data: dict[str, Any] | str) -> None:
            payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
            # A write waits while the caller does not read (once the socket buffers are full): within the deadline.
            try:
                async with asyncio.timeout_at(end):
                    await response.write(f"data: {payload}\n\n".encode())
            except TimeoutError as exc:
                raise _CallerStalled(response) from exc

        await send(exchange.chunk(first.text, first.finish_reason, first=True))
        try:
            async for delta in deltas:
                tally.add(delta)
                await send(exchange.chunk(delta.text, delta.finish_reason))
            if tally.finish_reason is None:
                raise _Aborted
        except Exception as exc:
            if isinstance(exc, _CallerStalled):
                raise
            shown = render(exc) if not isinstance(exc, _Aborted) else None
            code = shown.code if shown else "generation_aborted"
            message = str(exc) if shown and shown.code != "internal_error" else "the generation did not complete"
            if shown is not None and shown.code == "internal_error":
                log.exception("openai endpoint: stream failed")
            await send(error_body(message, error_type="server_error", code=code))
            await response.write_eof()
            return response
        if include_usage:
            await send(exchange.usage_chunk(tally))
        await send("[DONE]")
        await response.write_eof()
        return response
    except _Aborted:
        return _json_error(502, "the generation did not complete", error_type="server_error", code="generation_aborted")
    except _CallerStalled as stalled:
        log.info("openai endpoint: a caller stopped reading its stream; connection closed")
        if http.transport is not None:
            http.transport.abort()  # ending the stream politely would wait on the same full buffer
        return stalled.response
    finally:
        await deltas.aclose()


async def _models(request: web.Request) -> web.Response:
    created = request.app[CONFIG].created
    data = [
        {"id": m.name, "object": "model", "created": created, "owned_by": "planetserve"}
        for m in request.app[SERVICE].models()
    ]
    return web.json_response({"object": "list", "data": data})


async def _completions(request: web.Request) -> web.StreamResponse:
    try:
        req = CompletionsRequest.model_validate(await _read_json(request))
    except ValidationError as exc:
        raise _validation_error(exc) from exc
    service, config = request.app[SERVICE], request.app[CONFIG]
    served = service.resolve_model(req.model)
    completion = _completion_request(
        served,
        req.prompt_text(),
        max_tokens=req.max_tokens or config.default_max_tokens,
        req=req,
        stop=req.stop_strings(),
    )
    exchange = _Exchange(chat=False, served=served, request=completion, config=config)
    return await _respond(request, exchange, service, stream=req.stream, include_usage=req.include_usage())


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    try:
        req = ChatCompletionsRequest.model_validate(await _read_json(request))
    except ValidationError as exc:
        raise _validation_error(exc) from exc
    stops = req.stop_strings()
    if len(stops) > 3:
        raise InvalidParams(
            param="stop", value=len(stops), reason="at most 3 stop strings for chat (the template adds one)"
        )
    messages = [
        ChatMessage(role="system" if m.role == "developer" else m.role, content=m.content) for m in req.messages
    ]
    prompt = render_chat(messages)
    if len(prompt) > MAX_PROMPT_CHARS:
        # Each message is bounded by the wire model; the rendered conversation must fit one prompt too.
        raise InvalidParams(
            param="messages", value=None, reason=f"the conversation renders to over {MAX_PROMPT_CHARS} characters"
        )
    service, config = request.app[SERVICE], request.app[CONFIG]
    served = service.resolve_model(req.model)
    completion = _completion_request(
        served,
        prompt,
        max_tokens=req.token_limit(config.default_max_tokens),
        req=req,
        stop=(*stops, CHAT_STOP),
    )
    exchange = _Exchange(chat=True, served=served, request=completion, config=config)
    return await _respond(request, exchange, service, stream=req.stream, include_usage=req.include_usage())


async def _healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_openai_app(service: CompletionService, config: OpenAIConfig | None = None) -> web.Application:
    """The endpoint's root application; the OpenAI routes live on the ``/v1`` sub-app."""
    config = config or OpenAIConfig()
    root = web.Application(
        client_max_size=config.max_body_bytes,
        handler_args={
            "max_line_size": _MAX_LINE_SIZE,
            "max_field_size": _MAX_FIELD_SIZE,
            # aiohttp closes a connection that has not sent a whole request head this long after connecting (or
            # after its last response): the header-read timeout, which also ends idle kept-alive connections.
            "keepalive_timeout": config.header_timeout_s,
        },
    )
    # Middleware order is fixed: limits (auth, in-flight bound) first, then error mapping.
    v1 = web.Application(client_max_size=config.max_body_bytes, middlewares=[_limits, _errors])
    for app in (root, v1):
        app[SERVICE] = service
        app[CONFIG] = config
    v1[SLOTS] = asyncio.Semaphore(config.max_concurrent)
    v1.router.add_get("/models", _models)
    v1.router.add_post("/completions", _completions)
    v1.router.add_post("/chat/completions", _chat_completions)
    root.router.add_get("/healthz", _healthz)
    root.add_subapp("/v1", v1)
    return root
