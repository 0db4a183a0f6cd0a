"""§6.3: the paths of one request do not share one expiry, and a request's onion packets show only its size class.

The destination here is a raw aiohttp server holding a real onion key: it peels every packet the client sends it
(real ``node.privacy.peel``), records its length and expiry, and refuses it, so the client gives up; what is
checked is what the client put on the wire.
"""

from __future__ import annotations

import math
import secrets
import time

import aiohttp
import pytest
from aiohttp import web

from node.overlay import ClientSettings, ReplyIncomplete, send_request
from node.overlay._localnet import serve_ephemeral
from node.overlay._peers import Peer
from node.overlay._relay import ONION_PATH
from node.privacy import InvalidPrivacyParam, OnionKey, PeeledExit, keyring, peel
from node.privacy._constants import EXPIRY_GRANULARITY, MAX_PAYLOAD, ONION_HEADER_LEN, REQUEST_CLASSES
from node.privacy._sizeclass import size_class


async def _record(body: bytes, settings: ClientSettings) -> list[tuple[int, int]]:
    """(packet length, expiry) of every clove of one request, as the destination receives them."""
    key = OnionKey(secrets.token_bytes(32))
    seen: list[tuple[int, int]] = []

    async def handle(request: web.Request) -> web.Response:
        packet = await request.read()
        peeled = peel(packet, keyring(key))
        assert isinstance(peeled, PeeledExit)
        seen.append((len(packet), peeled.expiry))
        return web.json_response({"error": {"code": "overloaded"}}, status=503)

    app = web.Application()
    app.router.add_post(ONION_PATH, handle)
    runner, endpoint = await serve_ephemeral(app)
    try:
        destination = Peer(node_id=secrets.token_bytes(20), endpoint=endpoint, public_key=key.public)
        async with aiohttp.ClientSession() as session:
            with pytest.raises(ReplyIncomplete):
                async for _ in send_request(session, body, [[] for _ in range(settings.n)], destination, settings):
                    pass
    finally:
        await runner.cleanup()
    assert len(seen) == settings.n
    return seen


async def test_the_cloves_of_one_request_carry_different_expiries_within_the_jitter() -> None:
    settings = ClientSettings(n=16, k=2, ttl_s=60, ttl_jitter_s=20)
    before = time.time()
    expiries = [expiry for _, expiry in await _record(b"prompt", settings)]
    after = time.time()
    # 16 lifetimes drawn from 40..60 s fall into 2 or 3 expiry buckets; all in one has probability about 2^-15.
    assert len(set(expiries)) > 1
    lowest = math.ceil((before + 40) / EXPIRY_GRANULARITY) * EXPIRY_GRANULARITY
    highest = math.ceil((after + 60) / EXPIRY_GRANULARITY) * EXPIRY_GRANULARITY
    assert all(lowest <= e <= highest for e in expiries)


async def test_without_jitter_every_clove_of_a_request_has_one_expiry() -> None:
    """The control for the test above: the difference comes from the per-path draw, nothing else."""
    expiries = {expiry for _, expiry in await _record(b"prompt", ClientSettings(n=16, k=2, ttl_jitter_s=0))}
    assert len(expiries) == 1


@pytest.mark.parametrize(("short", "long", "onion_payload"), [(100, 1500, 1024), (3000, 11_000, 4096)])
async def test_two_requests_of_one_size_class_have_identical_packet_sizes(
    short: int, long: int, onion_payload: int
) -> None:
    settings = ClientSettings(n=4, k=3)
    a = await _record(secrets.token_bytes(short), settings)
    b = await _record(secrets.token_bytes(long), settings)
    assert {length for length, _ in a} == {length for length, _ in b} == {ONION_HEADER_LEN + onion_payload}


async def test_without_size_classes_packet_sizes_follow_the_request_length() -> None:
    settings = ClientSettings(n=4, k=3, size_classes=False)
    a = {length for length, _ in await _record(secrets.token_bytes(100), settings)}
    b = {length for length, _ in await _record(secrets.token_bytes(1500), settings)}
    assert a != b


def test_size_class_is_the_smallest_class_that_holds_the_clove() -> None:
    assert size_class(0) == REQUEST_CLASSES[0]
    assert size_class(1020) == 1024 and size_class(1021) == 4096
    assert size_class(MAX_PAYLOAD - 4) == MAX_PAYLOAD
    with pytest.raises(InvalidPrivacyParam):
        size_class(MAX_PAYLOAD - 3)


@pytest.mark.parametrize(("ttl", "jitter"), [(0, 0), (121, 0), (60, 60), (60, -1)])
def test_client_settings_refuse_a_lifetime_or_jitter_out_of_range(ttl: int, jitter: int) -> None:
    with pytest.raises(InvalidPrivacyParam):
        ClientSettings(ttl_s=ttl, ttl_jitter_s=jitter)
