"""The ``Client``'s real transport reads a heartbeat to its end, within its bound: a body that arrives in several
segments (a slow link, a large cache summary) is read whole, and one past ``MAX_HEARTBEAT_BYTES`` is refused after
reading at most one byte more than the bound; a node that drops the connection or cuts its body short is one that
does not answer (the client's heartbeat monitor counts it silent) and fails no request. A real aiohttp server on
127.0.0.1."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp import web
from eth_account import Account

from node.client import OverlayTransport
from node.client._heartbeats import HeartbeatMonitor
from node.overlay import ModelNode
from node.overlay._heartbeat import HEARTBEAT_PATH, MAX_HEARTBEAT_BYTES, Heartbeat, sign_heartbeat
from node.testing import serve_ephemeral
from planetserve import ModelId


def _body() -> bytes:
    operator = Account.create()
    beat = Heartbeat(
        node=operator.address,
        model=ModelId.of("tiny@1"),
        seq=1,
        issued_at_ms=int(time.time() * 1000),
        queued_requests=0,
        running_requests=0,
        queued_tokens=0,
        ttft_ms_p50=0.0,
    )
    return sign_heartbeat(beat, operator).model_dump_json().encode()


async def _serving(pieces: list[bytes]) -> tuple[web.AppRunner, str]:
    async def heartbeat(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        try:
            for piece in pieces:
                await response.write(piece)
                await asyncio.sleep(0.05)  # each piece in a later segment
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client stopped reading past the bound and closed: what the second test expects
        return response

    app = web.Application()
    app.router.add_get(HEARTBEAT_PATH, heartbeat)
    return await serve_ephemeral(app)


async def test_a_heartbeat_in_several_segments_is_read_whole() -> None:
    body = _body()
    runner, endpoint = await _serving([body[:40], body[40:200], body[200:]])
    transport = OverlayTransport()
    try:
        assert await transport.fetch_heartbeat(endpoint) == body
    finally:
        await transport.close()
        await runner.cleanup()


async def test_a_heartbeat_past_the_bound_is_refused() -> None:
    chunk = b" " * 4096
    runner, endpoint = await _serving([chunk] * (MAX_HEARTBEAT_BYTES // len(chunk) + 2))
    transport = OverlayTransport()
    try:
        with pytest.raises(ValueError, match="too large"):
            await transport.fetch_heartbeat(endpoint)
    finally:
        await transport.close()
        await runner.cleanup()


async def _broken(kind: str) -> tuple[web.AppRunner, str]:
    async def heartbeat(request: web.Request) -> web.StreamResponse:
        if kind == "dropped":
            assert request.transport is not None
            request.transport.close()  # no status line at all
            return web.Response()
        # A body cut short: announces more bytes than it sends, then closes.
        response = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": "1000"})
        await response.prepare(request)
        await response.write(b'{"heartbeat": ')
        assert request.transport is not None
        request.transport.close()
        return response

    app = web.Application()
    app.router.add_get(HEARTBEAT_PATH, heartbeat)
    return await serve_ephemeral(app)


@pytest.mark.parametrize("kind", ["dropped", "cut_short"])
async def test_a_node_that_breaks_its_heartbeat_connection_is_silent_and_fails_no_request(kind: str) -> None:
    runner, endpoint = await _broken(kind)
    transport = OverlayTransport()
    monitor = HeartbeatMonitor(fetch=transport.fetch_heartbeat)
    node = ModelNode(
        operator=Account.create().address,
        endpoint=endpoint,
        public_key=bytes(32),
        model_id=ModelId.of("tiny@1"),
        price_per_1k_tokens=0,
    )
    try:
        with pytest.raises(OSError):
            await transport.fetch_heartbeat(endpoint)
        for _ in range(monitor.max_failures):
            await monitor.refresh([node])  # raised out of the monitor (and the request routing) before
        assert monitor.silent(node.operator) and monitor.rejected == 0
    finally:
        await transport.close()
        await runner.cleanup()
