"""The model-node side on a live server: a tampered clove is survived, a lone clove times out, replies are sealed."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import aiohttp

from node.overlay import OverlayConfig, send_request
from node.overlay._localnet import LocalNetwork
from node.privacy import Clove, Envelope, ReplyChunk, build_onion, open_reply, split
from node.privacy._constants import REPLY_CHUNK_LEN
from node.privacy._reply import apply_reply_layer, check_frame_len, destination_layer_key

ONION = "/overlay/v1/onion"


async def echo(request: bytes) -> AsyncIterator[bytes]:
    yield b"echo:" + request


async def _post_clove(session: aiohttp.ClientSession, net: LocalNetwork, clove: bytes, key: bytes) -> list[ReplyChunk]:
    packet = build_onion([net.destination.hop()], clove).packet
    async with session.post(net.destination.endpoint + ONION, data=packet) as response:
        if response.status != 200:
            return []
        chunks: list[ReplyChunk] = []
        while True:
            try:
                prefix = await response.content.readexactly(4)
            except asyncio.IncompleteReadError:
                return chunks
            body = await response.content.readexactly(check_frame_len(prefix))
            # §6.2: strip the destination's per-path layer (keyed by the clove's index; byte 4 of the clove).
            layered = body[:REPLY_CHUNK_LEN]
            chunks.append(
                open_reply(key, apply_reply_layer(destination_layer_key(key, clove[4]), len(chunks), layered))
            )


async def test_a_tampered_clove_is_skipped_and_the_other_k_rebuild_the_request() -> None:
    async with LocalNetwork(relays=0, handler=echo) as net, aiohttp.ClientSession() as session:
        key = secrets.token_bytes(32)
        cloves = [c.to_bytes() for c in split(Envelope(reply_key=key, body=b"prompt").to_bytes(), 4, 3)]
        bad = bytearray(cloves[0])
        bad[-1] ^= 0x01  # a valid clove layout with a corrupted fragment: only authentication can catch it
        tampered = Clove.from_bytes(bytes(bad)).to_bytes()
        # The tampered clove and two good ones arrive first: that combination fails authentication, and the
        # destination must wait for the fourth clove instead of giving up.
        first = [asyncio.create_task(_post_clove(session, net, c, key)) for c in (tampered, cloves[1], cloves[2])]
        assert net.model is not None
        async with asyncio.timeout(10):
            while True:
                async with session.get(net.model.endpoint + "/overlay/metrics") as response:
                    if (await response.json())["delivered"] == 3:
                        break
                await asyncio.sleep(0.01)
        assert not any(task.done() for task in first)
        last = asyncio.create_task(_post_clove(session, net, cloves[3], key))
        results = await asyncio.gather(*first, last)
        for chunks in results:
            assert b"".join(c.data for c in chunks) == b"echo:prompt"
            assert chunks[-1].final and not chunks[-1].error


async def test_a_lone_clove_times_out_with_a_counted_reason() -> None:
    template = OverlayConfig(x25519_secret=secrets.token_bytes(32), assembly_timeout_s=0.3)
    async with (
        LocalNetwork(relays=0, handler=echo, template=template) as net,
        aiohttp.ClientSession() as session,
    ):
        clove = split(Envelope(reply_key=bytes(32), body=b"x").to_bytes(), 3, 2)[0].to_bytes()
        packet = build_onion([net.destination.hop()], clove).packet
        async with session.post(net.destination.endpoint + ONION, data=packet) as response:
            assert response.status == 504
            assert (await response.json())["error"]["code"] == "upstream_timeout"
        assert net.model is not None
        async with session.get(net.model.endpoint + "/overlay/metrics") as response:
            metrics = await response.json()
        assert metrics["rejected"]["upstream_timeout"] == 1


async def test_finished_messages_make_room_when_the_message_table_is_full() -> None:
    template = OverlayConfig(x25519_secret=secrets.token_bytes(32), max_messages=2)
    async with (
        LocalNetwork(relays=0, handler=echo, template=template) as net,
        aiohttp.ClientSession() as session,
    ):
        for i in range(6):
            body = f"request {i}".encode()
            reply = b"".join([p async for p in send_request(session, body, [[]] * 4, net.destination)])
            assert reply == b"echo:" + body


async def test_the_sweeper_forgets_finished_and_never_assembled_messages() -> None:
    template = OverlayConfig(x25519_secret=secrets.token_bytes(32), message_linger_s=0.05, assembly_timeout_s=0.3)
    async with (
        LocalNetwork(relays=0, handler=echo, template=template) as net,
        aiohttp.ClientSession() as session,
    ):
        assert net.model is not None
        for i in range(3):
            assert b"".join([p async for p in send_request(session, b"%d" % i, [[]] * 4, net.destination)])
        lone = split(Envelope(reply_key=bytes(32), body=b"x").to_bytes(), 3, 2)[0].to_bytes()
        assert await _post_clove(session, net, lone, bytes(32)) == []
        in_flight: list[int] = []
        async with asyncio.timeout(5):
            while not in_flight or in_flight[-1]:
                async with session.get(net.model.endpoint + "/overlay/metrics") as response:
                    in_flight.append((await response.json())["messages_in_flight"])
                await asyncio.sleep(0.1)
        # Three finished (lingering) and the lone clove's, until the once-a-second sweep forgets them all.
        assert in_flight[-1] == 0 and max(in_flight) <= 4
