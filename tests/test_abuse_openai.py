"""What a stranger can make the OpenAI-compatible endpoint hold, allocate or spend, on a real aiohttp server on
127.0.0.1: slow bodies and heads, a streamed answer nobody reads, bodies that are not JSON (deep nesting, bad
charsets), browser-sent requests (a cross-site form post, DNS rebinding) that would spend the user's wallet, and
parameters of absurd size. The service behind the endpoint is its direct neighbour, a fake that counts the requests
that reached it: every refusal here must happen before anything is sent (or paid for).

Each bound is lowered through ``OpenAIConfig`` so the test runs in seconds; each test says what it saw before the
bound existed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import pytest

from node.client import OpenAIConfig, ServedModel, UnknownModel, create_openai_app
from node.overlay import CompletionDelta, CompletionRequest
from node.testing import serve_ephemeral
from planetserve import ModelId

MODEL = "m@v1"
GOOD = {"model": MODEL, "prompt": "hi", "max_tokens": 4}


class _Service:
    """The endpoint's direct neighbour: one model; the prompt ``endless`` streams 16 KiB deltas without end, any
    other prompt gets one delta."""

    def __init__(self) -> None:
        self.started = 0
        self.closed = 0
        self._model = ServedModel(name=MODEL, model_id=ModelId("0x" + "11" * 32), nodes=1)

    def models(self) -> Sequence[ServedModel]:
        return [self._model]

    def resolve_model(self, model: str) -> ServedModel:
        if model != MODEL:
            raise UnknownModel(model)
        return self._model

    async def stream(self, request: CompletionRequest) -> AsyncIterator[CompletionDelta]:
        self.started += 1
        try:
            count = 0
            while True:
                count += 1
                endless = request.prompt == "endless"
                yield CompletionDelta(
                    text="x" * 16384 if endless else "ok",
                    token_ids=(1,),
                    finish_reason=None if endless else "stop",
                    prompt_tokens=1,
                    completion_tokens=count,
                    cached_tokens=0,
                )
                if not endless:
                    return
                await asyncio.sleep(0)
        finally:
            self.closed += 1


@contextlib.asynccontextmanager
async def _endpoint(config: OpenAIConfig) -> AsyncIterator[tuple[_Service, str]]:
    service = _Service()
    runner, url = await serve_ephemeral(create_openai_app(service, config))
    try:
        yield service, url
    finally:
        await runner.cleanup()


async def _post(url: str, body: bytes, headers: dict[str, str], path: str = "/v1/completions") -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        # Without a Content-Type of ours, none at all (aiohttp would add application/octet-stream).
        session.post(url + path, data=body, headers=headers, skip_auto_headers=["Content-Type"]) as response,
    ):
        return response.status, await response.json()


async def _status_of_one(url: str) -> int:
    status, _ = await _post(url, json.dumps(GOOD).encode(), {"Content-Type": "application/json"})
    return status


@contextlib.asynccontextmanager
async def _raw(
    url: str, *, rcvbuf: int | None = None
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A plain TCP connection to the endpoint (a small receive buffer makes a caller that does not read felt soon)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def _until(predicate: Any, timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.02)


async def test_a_body_trickled_a_byte_at_a_time_gets_408_and_frees_its_slot() -> None:
    # Before body_timeout_s the read had no deadline: with max_concurrent=1 this one connection held the only slot
    # for as long as it kept trickling (every other caller got 429).
    async with _endpoint(OpenAIConfig(max_concurrent=1, body_timeout_s=0.5)) as (service, url), _raw(url) as io:
        reader, writer = io
        head = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        writer.write(f"{head}Content-Length: 4000\r\n\r\n{{".encode())
        await writer.drain()

        async def trickle() -> None:
            with contextlib.suppress(ConnectionError):
                while True:
                    await asyncio.sleep(0.1)
                    writer.write(b" ")
                    await writer.drain()

        trickler = asyncio.create_task(trickle())
        try:
            async with asyncio.timeout(5):
                status_line = await reader.readline()
            assert status_line.split()[1] == b"408"
            assert await _status_of_one(url) == 200
        finally:
            trickler.cancel()
            await asyncio.gather(trickler, return_exceptions=True)
        assert service.started == 1  # the trickled request never reached the network


async def test_a_connection_that_trickles_its_request_head_is_closed() -> None:
    # aiohttp's default keeps a connection without a whole request head for an hour (keepalive_timeout 3630 s).
    async with _endpoint(OpenAIConfig(header_timeout_s=0.5)) as (_service, url), _raw(url) as io:
        reader, writer = io
        loop = asyncio.get_running_loop()
        started = loop.time()
        closed_after: float | None = None
        for byte in f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: {'a' * 400}\r\n".encode():
            with contextlib.suppress(ConnectionError):
                writer.write(bytes([byte]))
            await asyncio.sleep(0.01)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.001):
                    if await reader.read(1) == b"":
                        closed_after = loop.time() - started
                        break
        assert closed_after is not None, "the endpoint kept a connection that sent header bytes for seconds"
        assert closed_after < 3.0


async def test_a_stream_its_caller_stops_reading_is_cut_at_the_deadline_and_frees_its_slot() -> None:
    # Before, the deadline covered only waiting for the next delta, not writing it: a caller that stopped reading
    # (a full socket buffer) held the slot, and the generation upstream, for good.
    config = OpenAIConfig(max_concurrent=1, request_timeout_s=3.0)  # 3 s: time to see the slot held, even loaded
    async with _endpoint(config) as (service, url), _raw(url, rcvbuf=4096) as io:
        _reader, writer = io
        body = json.dumps({"model": MODEL, "prompt": "endless", "max_tokens": 4096, "stream": True}).encode()
        head = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        await _until(lambda: service.started == 1, 5)
        assert await _status_of_one(url) == 429  # the reader-less stream holds the one slot...
        await _until(lambda: service.closed == 1, 10)  # ...until the deadline closes its generation
        assert await _status_of_one(url) == 200


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"[" * 200_000, "application/json"),  # nested past the decoder's recursion limit (was a 500 + traceback)
        (b'{"model": "m@v1", "prompt": "\xff\xfe"}', "application/json"),  # not UTF-8
        (json.dumps(GOOD).encode(), "application/json; charset=x-no-such-charset"),  # was a 500 (LookupError)
        (b'{"model": "m@v1", "prompt": 1e999999}', "application/json"),
        (b'{"model": "m@v1", "prompt": "hi", "seed": ' + b"9" * 5000 + b"}", "application/json"),
    ],
    ids=["nested", "not-utf8", "unknown-charset", "huge-float", "5000-digit-int"],
)
async def test_bodies_that_are_not_json_are_400_naming_the_body_and_log_nothing(
    body: bytes, content_type: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with _endpoint(OpenAIConfig()) as (service, url):
        with caplog.at_level(logging.WARNING, logger="node.client"):
            status, answer = await _post(url, body, {"Content-Type": content_type})
    assert status == 400 and answer["error"]["param"].split(".")[0] in ("body", "prompt", "seed")
    assert service.started == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # no traceback per junk request


async def test_a_conversation_rendering_past_the_prompt_limit_is_a_400_not_a_500(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Each message is within its own bound (65,536 characters), the whole is not: the overlay's request model refused
    # it, and the endpoint answered 500 with a traceback in its log.
    messages = [{"role": "user", "content": "a" * 60_000}] * 15
    body = json.dumps({"model": MODEL, "messages": messages}).encode()
    async with _endpoint(OpenAIConfig()) as (service, url):
        with caplog.at_level(logging.WARNING, logger="node.client"):
            status, answer = await _post(url, body, {"Content-Type": "application/json"}, "/v1/chat/completions")
    assert (status, answer["error"]["param"]) == (400, "messages")
    assert service.started == 0 and not caplog.records


@pytest.mark.parametrize(
    "headers",
    [
        {"Content-Type": "text/plain;charset=UTF-8"},  # fetch(url, {method: "POST", body: "..."}) from any page
        {"Content-Type": "application/x-www-form-urlencoded"},  # an HTML form
        {"Content-Type": "multipart/form-data; boundary=x"},
        {},  # a Blob without a type: no Content-Type at all
        {"Content-Type": "application/json", "Origin": "https://evil.example"},  # a page's fetch: Origin is its own
        {"Content-Type": "application/json", "Origin": "null"},  # a sandboxed frame or a file:// page
        {"Content-Type": "application/json", "Host": "evil.example:8080"},  # DNS rebinding: the page's own name
    ],
    ids=["text-plain", "form", "multipart", "no-type", "foreign-origin", "null-origin", "foreign-host"],
)
async def test_requests_a_web_page_can_make_the_browser_send_are_refused_before_anything_is_sent(
    headers: dict[str, str],
) -> None:
    # Before, each of these reached the network and was paid from the user's wallet: a browser sends a
    # "simple" cross-site POST without asking (CORS only hides the answer), and a rebound name is same-origin.
    async with _endpoint(OpenAIConfig()) as (service, url):
        status, answer = await _post(url, json.dumps(GOOD).encode(), headers)
        assert status in (403, 415), answer
        assert answer["error"]["code"] in ("host_not_allowed", "unsupported_media_type")
        assert service.started == 0
        # The control: the same body as an API client sends it is served.
        assert await _status_of_one(url) == 200


async def test_with_an_api_key_the_endpoint_serves_other_host_names() -> None:
    async with _endpoint(OpenAIConfig(api_key="k")) as (service, url):
        headers = {"Content-Type": "application/json", "Host": "node.lan:8080", "Authorization": "Bearer k"}
        status, _ = await _post(url, json.dumps(GOOD).encode(), headers)
        assert status == 200 and service.started == 1


@pytest.mark.parametrize(
    "extra",
    [
        {"max_tokens": 10**9},
        {"max_completion_tokens": 10**9},
        {"n": 1000},
        {"best_of": 50},
        {"logprobs": 5},
        {"stop": ["a"] * 10_000},
        {"stop": "a" * 100_000},
        {"prompt": ["a"] * 1000},
        {"prompt": "a" * 70_000},
        {"logit_bias": {str(i): 1.0 for i in range(1000)}},
        {"stream_options": {"include_usage": True, "other": True}},
        {"model": "m" * 10_000},
        {"model": "nobody@v1"},
    ],
    ids=lambda extra: ",".join(f"{k}={str(v)[:12]}" for k, v in extra.items()),
)
async def test_absurd_parameters_are_refused_before_anything_is_sent(extra: dict[str, Any]) -> None:
    async with _endpoint(OpenAIConfig()) as (service, url):
        status, answer = await _post(url, json.dumps({**GOOD, **extra}).encode(), {"Content-Type": "application/json"})
    assert status in (400, 404), answer
    assert answer["error"]["type"] == "invalid_request_error"
    assert service.started == 0


@pytest.mark.parametrize(
    "headers",
    [{"X-Pad": "a" * 9000}, {f"X-H{i}": "v" for i in range(200)}, {"a" * 9000: "v"}],
    ids=["long-value", "many-headers", "long-name"],
)
async def test_oversized_request_heads_are_refused_before_anything_is_sent(headers: dict[str, str]) -> None:
    async with _endpoint(OpenAIConfig()) as (service, url):
        async with (
            aiohttp.ClientSession() as session,
            session.post(url + "/v1/completions", json=GOOD, headers=headers) as response,
        ):
            assert 400 <= response.status < 500
        assert service.started == 0
        assert await _status_of_one(url) == 200


@pytest.mark.parametrize("host", ["127.0.0.1:8080", "localhost:8080", "LOCALHOST", "[::1]:8080"])
async def test_a_keyless_endpoint_serves_each_loopback_name(host: str) -> None:
    async with _endpoint(OpenAIConfig()) as (service, url):
        headers = {"Content-Type": "application/json", "Host": host, "Origin": f"http://{host}"}
        status, _ = await _post(url, json.dumps(GOOD).encode(), headers)
        assert status == 200 and service.started == 1


def test_the_endpoint_listens_on_loopback_unless_told_otherwise() -> None:
    # ps-client serve's --host defaults to 127.0.0.1 (ps-net up binds 127.0.0.1 always); beyond it, a keyless
    # endpoint still refuses every request that names another host (above).
    import typer.main

    from cli.client import app

    serve = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]
    (host,) = [p for p in serve.params if "--host" in p.opts]
    assert host.default == "127.0.0.1"
