"""What the server behind the openai-http engine (the operator's own, or a hosted OpenAI-compatible API) can do to
the model node in front of it: answers nested deep enough to crash a recursive JSON decoder are errors, not a dead
process. A real aiohttp upstream on 127.0.0.1, the engine fronting it as ``ps-node serve --upstream`` runs it."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from node.inference import GenerationRequest, InferenceError, InvalidParams, OpenAIHttpEngine, SamplingParams
from node.testing import serve_ephemeral

#: Deep enough to overflow the C stack of a recursive decoder once the recursion limit is py_ecc's 100,000 (the
#: process crashes at between 50,000 and 100,000 levels), and within every size bound the engine applies.
DEEP = b"[" * 150_000


@contextlib.contextmanager
def _production_recursion_limit() -> Iterator[None]:
    """The recursion limit of a running node: py_ecc (imported with web3) raises it to 100,000."""
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(max(before, 100_000))
    try:
        yield
    finally:
        sys.setrecursionlimit(before)


async def _engine_against(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]], tiny_model_dir: Path
) -> tuple[OpenAIHttpEngine, web.AppRunner]:
    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    runner, url = await serve_ephemeral(app)
    return OpenAIHttpEngine.from_folder(tiny_model_dir, url, upstream_model="m"), runner


async def _generate(engine: OpenAIHttpEngine) -> None:
    request = GenerationRequest(request_id="r", prompt="3+4=", params=SamplingParams(max_tokens=2))
    async for _ in engine.generate(request):
        pass


async def test_a_deeply_nested_stream_event_is_an_inference_error(tiny_model_dir: Path) -> None:
    async def nested(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: " + DEEP + b"\n\n")
        return response

    engine, runner = await _engine_against(nested, tiny_model_dir)
    try:
        with _production_recursion_limit(), pytest.raises(InferenceError, match="not JSON"):
            await _generate(engine)
    finally:
        await engine.close()
        await runner.cleanup()


async def test_a_deeply_nested_error_body_is_mapped_like_any_other(tiny_model_dir: Path) -> None:
    async def refusing(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=400, body=DEEP[:65536], content_type="application/json")

    engine, runner = await _engine_against(refusing, tiny_model_dir)
    try:
        with _production_recursion_limit(), pytest.raises(InvalidParams) as caught:
            await _generate(engine)
        assert caught.value.param == "request"
    finally:
        await engine.close()
        await runner.cleanup()
