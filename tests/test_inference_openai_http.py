"""The ``openai-http`` engine against real OpenAI-compatible servers on 127.0.0.1.

The conformance suite (test_inference_engine.py) runs every ``Engine`` test against it with our torch engine behind
``node.inference.testing.openai_app``. Here: what is specific to fronting an upstream — ``cached_tokens`` read from
``usage``, error mapping (with small servers that answer exactly the failure under test: the engine's direct
neighbour), servers that do not return token ids, aborts, and the test server itself checked with the ``openai`` SDK.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import openai
import pytest
from aiohttp import web

from node.inference import (
    EngineConfig,
    EngineOverloaded,
    EngineUnavailable,
    GenerationChunk,
    GenerationRequest,
    InferenceError,
    InvalidParams,
    OpenAIHttpEngine,
    SamplingParams,
    TorchEngine,
    load_engine,
)
from node.inference import _openai_http as openai_http
from node.inference._modelio import load_tokenizer
from node.inference._openai_http import cached_tokens_of, completion_body, token_id
from node.inference.testing import ThreadedServer, openai_app

LONG = "\n".join(f"{i}+{i + 3}={2 * i + 3}" for i in range(30))
MODEL = "ps-test-tiny"


@pytest.fixture
def torch_upstream(tiny_model_dir: Path) -> Iterator[str]:
    """Our torch engine behind the OpenAI-compatible test server; yields its URL."""
    engines: list[TorchEngine] = []

    async def make_app() -> web.Application:
        engines.append(TorchEngine.from_folder(tiny_model_dir, EngineConfig(device="cpu", max_queue=4)))
        return openai_app(engines[0], model=MODEL, tokenizer=load_tokenizer(tiny_model_dir))

    async def stop() -> None:
        await engines[0].close()

    with ThreadedServer(make_app, on_stop=stop) as server:
        yield server.url


@pytest.fixture
async def front(torch_upstream: str, tiny_model_dir: Path) -> AsyncIterator[OpenAIHttpEngine]:
    engine = OpenAIHttpEngine.from_folder(tiny_model_dir, torch_upstream)
    try:
        yield engine
    finally:
        await engine.close()


def _stub(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> ThreadedServer:
    async def make_app() -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", _models)
        app.router.add_post("/v1/completions", handler)
        return app

    return ThreadedServer(make_app)


async def _models(request: web.Request) -> web.Response:
    return web.json_response({"data": [{"id": MODEL}]})


async def _collect(engine: OpenAIHttpEngine, rid: str, prompt: str, **params: object) -> list[GenerationChunk]:
    request = GenerationRequest(request_id=rid, prompt=prompt, params=SamplingParams(**params))  # type: ignore[arg-type]
    return [chunk async for chunk in engine.generate(request)]


def test_the_request_body_uses_openai_names_and_asks_for_token_ids_and_usage() -> None:
    body = completion_body(MODEL, [1, 2], SamplingParams(max_tokens=3, temperature=0.5, top_k=7, seed=9), stream=True)
    assert body == {
        "model": MODEL,
        "prompt": [1, 2],
        "max_tokens": 3,
        "temperature": 0.5,
        "top_p": 1.0,
        "logprobs": 1,
        "return_tokens_as_token_ids": True,
        "stream": True,
        "top_k": 7,
        "seed": 9,
        "stream_options": {"include_usage": True},
    }
    assert token_id("token_id:42") == 42 and token_id("hello") is None and token_id("token_id:x") is None
    assert cached_tokens_of({"prompt_tokens_details": {"cached_tokens": 32}}) == 32
    assert cached_tokens_of({"prompt_tokens": 5}) == 0 and cached_tokens_of(None) == 0


async def test_cached_tokens_come_from_the_upstreams_usage(front: OpenAIHttpEngine) -> None:
    first = await _collect(front, "a", LONG + " the red", max_tokens=4, temperature=0)
    second = await _collect(front, "b", LONG + " the dog", max_tokens=4, temperature=0)
    assert first[-1].cached_tokens == 0
    assert second[-1].cached_tokens > 0 and second[-1].cached_tokens % 16 == 0


async def test_closing_the_stream_early_releases_the_request(front: OpenAIHttpEngine) -> None:
    stream = front.generate(GenerationRequest(request_id="x", prompt=LONG, params=SamplingParams(max_tokens=200)))
    await anext(stream)
    assert front.stats().running_requests == 1
    await stream.aclose()
    assert front.stats().running_requests == 0


async def test_abort_ends_the_stream_with_finish_reason_abort(front: OpenAIHttpEngine) -> None:
    chunks: list[GenerationChunk] = []
    request = GenerationRequest(request_id="x", prompt=LONG, params=SamplingParams(max_tokens=300, temperature=0))
    async for chunk in front.generate(request):
        chunks.append(chunk)
        if len(chunks) == 2:
            assert await front.abort("x")
    assert chunks[-1].finish_reason == "abort"
    assert sum(len(c.token_ids) for c in chunks) < 300
    assert not await front.abort("x")


async def test_the_test_server_speaks_the_openai_protocol(torch_upstream: str, tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    ids = tokenizer.encode("3+4=", add_special_tokens=False)
    client = openai.AsyncOpenAI(base_url=torch_upstream + "/v1", api_key="unused", max_retries=0)
    try:
        models = await client.models.list()
        assert [m.id for m in models.data] == [MODEL]
        reply = await client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0, logprobs=1)
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage is not None and reply.usage.prompt_tokens == len(ids)
        pieces: list[str] = []
        stream = await client.completions.create(
            model=MODEL, prompt=ids, max_tokens=5, temperature=0, stream=True, stream_options={"include_usage": True}
        )
        async for event in stream:
            pieces.extend(choice.text for choice in event.choices)
        assert "".join(pieces) == reply.choices[0].text
        with pytest.raises(openai.BadRequestError):
            await client.completions.create(model=MODEL, prompt=ids, max_tokens=0)
    finally:
        await client.close()


async def test_a_server_without_token_ids_is_served_by_retokenizing(tiny_model_dir: Path) -> None:
    async def text_only(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for text, reason in ((" the", None), (" red cat", "length")):
            event = {"choices": [{"index": 0, "text": text, "finish_reason": reason}]}
            await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response

    tokenizer = load_tokenizer(tiny_model_dir)
    with _stub(text_only) as server:
        engine = OpenAIHttpEngine.from_folder(tiny_model_dir, server.url)
        try:
            chunks = await _collect(engine, "t", "3+4=", max_tokens=3)
        finally:
            await engine.close()
    assert "".join(c.text for c in chunks) == " the red cat"
    assert [t for c in chunks for t in c.token_ids] == (
        tokenizer.encode(" the", add_special_tokens=False) + tokenizer.encode(" red cat", add_special_tokens=False)
    )
    assert chunks[-1].finish_reason == "length"


@pytest.mark.parametrize(
    ("status", "expected"),
    [(429, EngineOverloaded), (503, EngineOverloaded), (400, InvalidParams), (500, InferenceError)],
)
async def test_upstream_errors_map_onto_the_engine_error_tree(
    tiny_model_dir: Path, status: int, expected: type[Exception]
) -> None:
    async def failing(request: web.Request) -> web.Response:
        body = {"error": {"message": "the prompt 'secret words' is bad", "param": "prompt", "code": "x"}}
        return web.json_response(body, status=status)

    with _stub(failing) as server:
        engine = OpenAIHttpEngine.from_folder(tiny_model_dir, server.url)
        try:
            with pytest.raises(expected) as info:
                await _collect(engine, "e", "3+4=")
            with pytest.raises(expected):
                await engine.score("3+4=", "7")
        finally:
            await engine.close()
    assert "secret" not in str(info.value), "the upstream's message may quote the prompt: never repeated"
    if isinstance(info.value, InvalidParams):
        assert info.value.param == "prompt"


async def test_a_malformed_stream_is_an_inference_error(tiny_model_dir: Path) -> None:
    async def broken(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: {not json\n\n")
        return response

    with _stub(broken) as server:
        engine = OpenAIHttpEngine.from_folder(tiny_model_dir, server.url)
        try:
            with pytest.raises(InferenceError, match="not JSON"):
                await _collect(engine, "m", "3+4=")
        finally:
            await engine.close()


async def test_an_unreachable_upstream_is_engine_unavailable(tiny_model_dir: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    engine = OpenAIHttpEngine.from_folder(tiny_model_dir, f"http://127.0.0.1:{port}", upstream_model=MODEL)
    try:
        with pytest.raises(EngineUnavailable) as info:
            await _collect(engine, "u", "3+4=")
        assert info.value.engine == "openai-http"
        assert not await engine.check_health()
    finally:
        await engine.close()


def test_the_factory_requires_an_upstream_for_openai_http_only(tiny_model_dir: Path) -> None:
    with pytest.raises(InvalidParams) as info:
        load_engine("openai-http", tiny_model_dir)
    assert info.value.param == "upstream"
    with pytest.raises(InvalidParams) as info:
        load_engine("torch", tiny_model_dir, upstream="http://127.0.0.1:1")
    assert info.value.param == "upstream"
    with pytest.raises(InvalidParams):
        load_engine("openai-http", tiny_model_dir, upstream="ftp://127.0.0.1")


async def test_an_endless_score_answer_is_refused_at_the_bound_not_held(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A score is one non-streamed JSON answer: an upstream that sends one without end is cut at
    ``MAX_REPLY_BYTES`` (here lowered) with an error, instead of the node holding all of it."""
    sent: list[int] = []

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(b'{"choices": [{"logprobs": {"token_logprobs": [')
        try:
            for _ in range(4096):
                await response.write(b"-0.5, " * 1024)
                sent.append(1)
        except (ConnectionResetError, RuntimeError):
            pass  # the engine stopped reading and closed the connection
        return response

    with _stub(endless) as server:
        engine = OpenAIHttpEngine.from_folder(tiny_model_dir, server.url)
        try:
            monkeypatch.setattr(openai_http, "MAX_REPLY_BYTES", 64 * 1024)
            with pytest.raises(InferenceError, match="over 65536 bytes"):
                await engine.score("3+4=", "7")
        finally:
            await engine.close()
    assert len(sent) < 4096, "the whole endless answer was read"
