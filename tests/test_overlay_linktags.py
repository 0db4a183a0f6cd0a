"""Reply link tags (§6.2) checked live, and path de-correlation (§6.3), over real aiohttp servers on 127.0.0.1.

A malicious relay here is a raw aiohttp server that peels and forwards like a relay (it is a registered node, so
honest relays route to it) but tampers with the reply frames it sends back. The honest relay before it must close
the stream at the first frame whose link tag fails; the client must still complete over its other paths.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from node.overlay import ClientSettings, keys, send_request
from node.overlay._localnet import LocalNetwork, LocalNode, serve_ephemeral
from node.overlay._peers import Peer, StaticPeerDirectory
from node.overlay._relay import ONION_PATH
from node.privacy import OnionKey, PeeledForward, RelayDescriptor, build_onion, keyring, peel
from node.privacy._constants import FRAME_LEN_BYTES
from node.privacy._reply import FrameReader, FrameWriter, apply_reply_layer, check_frame_len

REPLY = b"0123456789abcdef" * 125  # 2000 bytes: 5 reply chunks, so there are frames to reorder


async def long_reply(_request: bytes) -> AsyncIterator[bytes]:
    yield REPLY


def _flip_one(frames: list[bytes]) -> list[bytes]:
    """A bit of frame 1's body changed after it was tagged (a relay or anyone on the link)."""
    bad = bytearray(frames[1])
    bad[FRAME_LEN_BYTES + 10] ^= 0x01
    return [frames[0], bytes(bad), *frames[2:]]


def _inject(frames: list[bytes]) -> list[bytes]:
    """Frame 0 sent again as frame 1 (a valid tag, for the wrong index)."""
    return [frames[0], frames[0], *frames[1:]]


def _reorder(frames: list[bytes]) -> list[bytes]:
    return [frames[1], frames[0], *frames[2:]]


@dataclass
class EvilRelay:
    """A registered node that relays like an honest one but passes its reply frames through ``tamper``.

    With ``retag`` it changes a chunk's bytes before tagging them with its own link key: the one change its
    predecessor cannot see (§6.2, "Cannot"), which only the client detects, end to end.
    """

    tamper: Callable[[list[bytes]], list[bytes]] = lambda frames: frames
    retag: bool = False
    key: OnionKey = field(default_factory=lambda: OnionKey(secrets.token_bytes(32)))
    node_id: bytes = field(default_factory=lambda: secrets.token_bytes(20))
    endpoint: str = ""
    peers: StaticPeerDirectory = field(default_factory=StaticPeerDirectory)
    """The network's registry stand-in: it forwards only to registered nodes, too."""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        peeled = peel(await request.read(), keyring(self.key))
        assert isinstance(peeled, PeeledForward)
        peer = await self.peers.resolve(peeled.next_node)
        assert peer is not None
        async with (
            aiohttp.ClientSession() as session,
            session.post(peer.endpoint + ONION_PATH, data=peeled.packet, allow_redirects=False) as upstream,
        ):
            response = web.StreamResponse(status=upstream.status)
            await response.prepare(request)
            reader = FrameReader(peeled.next_link_key)
            writer = FrameWriter.for_hop(peeled.keys.reply)
            frames = []
            while True:
                try:
                    prefix = await asyncio.wait_for(upstream.content.readexactly(FRAME_LEN_BYTES), 10)
                except asyncio.IncompleteReadError:
                    break
                body = reader.open(await upstream.content.readexactly(check_frame_len(prefix)))
                if self.retag and reader.index == 1:
                    body = apply_reply_layer(secrets.token_bytes(32), 0, body)  # garble chunk 0, then tag it
                frames.append(writer.seal(body))
            assert len(frames) >= 3
            for frame in self.tamper(frames):
                await response.write(frame)
            await response.write_eof()
            return response

    def descriptor(self) -> RelayDescriptor:
        return RelayDescriptor(
            node_id="0x" + self.node_id.hex(), operator="evil", endpoint=self.endpoint, public_key=self.key.public
        )


async def _run_with_evil_relay(evil: EvilRelay) -> tuple[bytes, LocalNode, list[LocalNode]]:
    """Three paths (n=3, k=2): [honest H, evil, honest] and two honest 2-relay paths. Returns the reply, H, and the
    relays of the honest paths."""
    async with LocalNetwork(relays=6, handler=long_reply) as net, aiohttp.ClientSession() as session:
        app = web.Application()
        app.router.add_post(ONION_PATH, evil.handle)
        runner, evil.endpoint = await serve_ephemeral(app)
        evil.peers = net.peers
        try:
            net.peers.add(Peer(node_id=evil.node_id, endpoint=evil.endpoint, public_key=evil.key.public))
            r = net.descriptors()
            paths = [[r[0], evil.descriptor(), r[1]], [r[2], r[3]], [r[4], r[5]]]
            stream = send_request(session, b"prompt", paths, net.destination, ClientSettings(n=3, k=2))
            reply = b"".join([piece async for piece in stream])
            await net.settle()
            return reply, net.relay_nodes[0], net.relay_nodes[2:]
        finally:
            await runner.cleanup()


@pytest.mark.parametrize("tamper", [_flip_one, _inject, _reorder], ids=["modified", "injected", "reordered"])
async def test_next_honest_hop_closes_a_stream_with_a_bad_link_tag_and_the_client_completes_elsewhere(
    tamper: Callable[[list[bytes]], list[bytes]],
) -> None:
    # Before this check was unconditional (the relay read ``getattr(peeled, "next_link_key", None)`` and, with no
    # key, passed frames on unchecked), H would have completed this stream and forwarded the tampered frame.
    reply, honest, others = await _run_with_evil_relay(EvilRelay(tamper=tamper))
    assert reply == REPLY
    metrics = honest.overlay[keys.METRICS]
    assert (metrics.streams_aborted, metrics.streams_completed) == (1, 0)
    assert all(n.overlay[keys.METRICS].streams_aborted == 0 for n in others)


async def test_a_relay_that_retags_changed_bytes_passes_its_predecessor_but_not_the_client() -> None:
    """§6.2 "Cannot": the successor holds the link key, so only the client sees the change; it completes anyway."""
    reply, honest, _others = await _run_with_evil_relay(EvilRelay(retag=True))
    assert reply == REPLY
    metrics = honest.overlay[keys.METRICS]
    assert (metrics.streams_aborted, metrics.streams_completed) == (0, 1)


async def test_a_relay_whose_previous_hop_hung_up_before_the_reply_started_leaves_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The next hop answers 200 only after the previous hop has gone: the relay must not fail the request with an
    unhandled error (before: aiohttp logged "Error handling request" with a ConnectionResetError from prepare)."""
    answered = asyncio.Event()

    async def slow_next_hop(request: web.Request) -> web.StreamResponse:
        await request.read()
        await asyncio.sleep(0.3)
        response = web.StreamResponse(status=200)
        await response.prepare(request)
        await response.write_eof()
        answered.set()
        return response

    async with LocalNetwork(relays=1, handler=long_reply) as net, aiohttp.ClientSession() as session:
        app = web.Application()
        app.router.add_post(ONION_PATH, slow_next_hop)
        runner, endpoint = await serve_ephemeral(app)
        try:
            key = OnionKey(secrets.token_bytes(32))
            next_hop = Peer(node_id=secrets.token_bytes(20), endpoint=endpoint, public_key=key.public)
            net.peers.add(next_hop)
            relay = net.relay_nodes[0]
            packet = build_onion([relay.hop(), next_hop.hop()], b"clove").packet
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1):
                    await session.post(relay.endpoint + ONION_PATH, data=packet)
            async with asyncio.timeout(5):
                await answered.wait()
            await net.settle()
        finally:
            await runner.cleanup()
    assert relay.overlay[keys.METRICS].streams_aborted == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_the_client_checks_the_link_tags_of_a_direct_path_too(caplog: pytest.LogCaptureFixture) -> None:
    """A direct path's first hop is the destination: its frames carry the exit hop's link tag, which the client
    now checks (``BuiltOnion.reply_keys[0]``). Before, it had no key for that link and only found the change end to
    end (a "bad chunk", then reading the path to its end); now the path fails at the frame (``MalformedPacket``).
    Here an on-path tamperer sits between the client and the destination."""
    async with LocalNetwork(relays=1, handler=long_reply) as net, aiohttp.ClientSession() as session:
        real = net.destination

        async def tampering_proxy(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            async with session.post(real.endpoint + ONION_PATH, data=body, allow_redirects=False) as upstream:
                frames = []
                while True:
                    try:
                        prefix = await asyncio.wait_for(upstream.content.readexactly(FRAME_LEN_BYTES), 10)
                    except asyncio.IncompleteReadError:
                        break
                    frames.append(prefix + await upstream.content.readexactly(check_frame_len(prefix)))
            response = web.StreamResponse(status=200)
            await response.prepare(request)
            for frame in _flip_one(frames):
                await response.write(frame)
            await response.write_eof()
            return response

        app = web.Application()
        app.router.add_post(ONION_PATH, tampering_proxy)
        runner, endpoint = await serve_ephemeral(app)
        try:
            via_proxy = Peer(node_id=real.node_id, endpoint=endpoint, public_key=real.public_key)
            caplog.set_level(logging.INFO, logger="node.overlay._client")
            # Path 0 is direct, so it goes to the proxy (the client's view of the destination's endpoint); path 1
            # goes through a relay, which finds the destination's real endpoint in its own directory.
            paths: list[list[RelayDescriptor]] = [[], [net.descriptors()[0]]]
            stream = send_request(session, b"prompt", paths, via_proxy, ClientSettings(n=2, k=2))
            assert b"".join([piece async for piece in stream]) == REPLY
            async with asyncio.timeout(5):
                while not any("path failed: MalformedPacket" in r.getMessage() for r in caplog.records):
                    await asyncio.sleep(0.01)
            assert not any("bad chunk" in r.getMessage() for r in caplog.records)
        finally:
            await runner.cleanup()
