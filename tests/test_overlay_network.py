"""End to end over real aiohttp servers on 127.0.0.1: 3-hop onion paths, S-IDA, streamed replies on reverse paths."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from node.overlay import (
    ClientSettings,
    DestinationFailed,
    OverlayConfig,
    OverlayError,
    ReplyIncomplete,
    create_app,
    keys,
    send_request,
)
from node.overlay._localnet import LocalNetwork, serve_ephemeral
from node.overlay._peers import Peer, StaticPeerDirectory
from node.privacy import OnionKey, PeeledForward, RelayDescriptor, keyring, peel, select_paths


async def reversing_handler(request: bytes) -> AsyncIterator[bytes]:
    """Streams the request back reversed, in 7-byte pieces, like tokens."""
    text = request[::-1]
    for start in range(0, len(text), 7):
        await asyncio.sleep(0)
        yield text[start : start + 7]


async def slow_counter(request: bytes) -> AsyncIterator[bytes]:
    """Yields ``count`` numbered pieces with a pause between them, so a test can act mid-stream."""
    count = int(request.decode())
    for i in range(count):
        await asyncio.sleep(0.02)
        yield f"[{i}]".encode()


async def failing_handler(request: bytes) -> AsyncIterator[bytes]:
    yield b"partial"
    raise RuntimeError("engine died")


async def _collect(stream: AsyncIterator[bytes]) -> bytes:
    return b"".join([piece async for piece in stream])


async def test_request_travels_four_3_hop_paths_and_reply_streams_back() -> None:
    async with LocalNetwork(relays=12, handler=reversing_handler) as net, aiohttp.ClientSession() as session:
        paths = select_paths(net.descriptors(), 4, 3)
        body = b"a private prompt " * 200
        reply = await _collect(send_request(session, body, paths, net.destination))
        assert reply == body[::-1]
        assert net.model is not None
        forwarded = 0
        for node in net.relay_nodes:
            async with session.get(node.endpoint + "/overlay/metrics") as response:
                forwarded += (await response.json())["forwarded"]
        assert forwarded == 12  # each of the 12 relays forwarded one packet
        async with session.get(net.model.endpoint + "/overlay/metrics") as response:
            snapshot = await response.json()
        assert snapshot["delivered"] == 4 and snapshot["messages_served"] == 1 and snapshot["rejected_total"] == 0


async def test_long_reply_is_split_into_chunks_and_reassembled_in_order() -> None:
    async def big(request: bytes) -> AsyncIterator[bytes]:
        yield bytes(range(256)) * 200  # 51200 bytes: four reply chunks

    async with LocalNetwork(relays=8, handler=big) as net, aiohttp.ClientSession() as session:
        paths = select_paths(net.descriptors(), 4, 3)
        assert await _collect(send_request(session, b"go", paths, net.destination)) == bytes(range(256)) * 200


async def test_a_dead_relay_before_the_request_still_delivers_with_k_of_n() -> None:
    async with LocalNetwork(relays=12, handler=reversing_handler) as net, aiohttp.ClientSession() as session:
        paths = select_paths(net.descriptors(), 4, 3)
        await net.node_at(paths[2][1].endpoint).stop()
        assert await _collect(send_request(session, b"hello", paths, net.destination)) == b"olleh"


async def test_a_relay_dying_mid_stream_does_not_break_the_reply() -> None:
    async with LocalNetwork(relays=12, handler=slow_counter) as net, aiohttp.ClientSession() as session:
        paths = select_paths(net.descriptors(), 4, 3)
        victim = net.node_at(paths[0][1].endpoint)
        received: list[bytes] = []
        async for piece in send_request(session, b"40", paths, net.destination):
            received.append(piece)
            if len(received) == 5:
                await victim.stop()
        assert b"".join(received) == b"".join(f"[{i}]".encode() for i in range(40))
        # The path really was cut mid-stream: the relay after the victim could not pass the rest of the reply back.
        async with session.get(paths[0][2].endpoint + "/overlay/metrics") as response:
            downstream = await response.json()
        assert downstream["streams_aborted"] == 1 and downstream["streams_completed"] == 0


async def test_too_many_dead_paths_raise_reply_incomplete_at_once_naming_them() -> None:
    # The model node's assembly timeout stays at its 20 s default: the client must not wait for it.
    async with LocalNetwork(relays=12, handler=reversing_handler) as net, aiohttp.ClientSession() as session:
        paths = select_paths(net.descriptors(), 4, 3)
        await net.node_at(paths[0][0].endpoint).stop()  # refuses connections: the first hop itself
        await net.node_at(paths[1][2].endpoint).stop()  # the last relay: its predecessor answers 502
        with pytest.raises(ReplyIncomplete) as info:
            async with asyncio.timeout(10):
                await _collect(send_request(session, b"x", paths, net.destination))
        assert sorted(info.value.failed_early) == [0, 1] and info.value.started == () and info.value.received == 0


async def test_handler_failure_reaches_the_client_as_destination_failed() -> None:
    async with LocalNetwork(relays=6, handler=failing_handler) as net, aiohttp.ClientSession() as session:
        paths = select_paths(net.descriptors(), 2, 3)
        with pytest.raises(DestinationFailed):
            await _collect(send_request(session, b"x", paths, net.destination, ClientSettings(n=2, k=2)))


async def test_health_readiness_and_draining() -> None:
    async with LocalNetwork(relays=1, handler=reversing_handler) as net, aiohttp.ClientSession() as session:
        relay = net.relay_nodes[0]
        async with session.get(relay.endpoint + "/overlay/healthz") as response:
            assert response.status == 200
        async with session.get(relay.endpoint + "/overlay/readyz") as response:
            assert response.status == 200 and (await response.json())["ready"] is True
        relay.overlay[keys.RELAY_STATE].draining = True
        async with session.get(relay.endpoint + "/overlay/readyz") as response:
            assert response.status == 503
        async with session.post(relay.endpoint + "/overlay/v1/onion", data=b"x") as response:
            assert response.status == 503
            assert (await response.json())["error"]["code"] == "overloaded"


def test_model_role_requires_a_handler() -> None:
    with pytest.raises(OverlayError):
        create_app(OverlayConfig(x25519_secret=bytes(range(32)), role="model"))


async def test_a_long_reply_on_four_paths_finishes_even_with_a_slow_reader() -> None:
    async def many(request: bytes) -> AsyncIterator[bytes]:
        for i in range(600):
            yield i.to_bytes(2, "big")

    async with LocalNetwork(relays=4, handler=many) as net, aiohttp.ClientSession() as session:
        paths = [[d] for d in net.descriptors()]
        received = []
        async with asyncio.timeout(60):
            async for piece in send_request(session, b"go", paths, net.destination):
                received.append(piece)
                await asyncio.sleep(0)
        assert b"".join(received) == b"".join(i.to_bytes(2, "big") for i in range(600))


async def _relay_streams(session: aiohttp.ClientSession, net: LocalNetwork) -> tuple[int, int]:
    completed = aborted = 0
    for node in net.relay_nodes:
        async with session.get(node.endpoint + "/overlay/metrics") as response:
            metrics = await response.json()
        completed += metrics["streams_completed"]
        aborted += metrics["streams_aborted"]
    return completed, aborted


@pytest.mark.parametrize(("grace_s", "drained"), [(5.0, True), (0.0, False)])
async def test_slower_paths_drain_after_a_complete_reply_so_their_connections_are_kept(
    grace_s: float, drained: bool
) -> None:
    # n = k = 2: the request needs the 3-hop clove, but the reply reaches the client first on the direct path
    # (no per-path reply-start jitter here: a random delay on the direct path could let the 3-hop one win).
    template = OverlayConfig(x25519_secret=secrets.token_bytes(32), reply_start_jitter_s=0.0)
    async with (
        LocalNetwork(relays=3, handler=reversing_handler, template=template) as net,
        aiohttp.ClientSession() as session,
    ):
        paths = [select_paths(net.descriptors(), 1, 3)[0], []]
        settings = ClientSettings(n=2, k=2, drain_grace_s=grace_s)
        for i in range(3):
            body = b"request %d" % i
            assert await _collect(send_request(session, body, paths, net.destination, settings)) == body[::-1]
            await net.settle()
        completed, aborted = await _relay_streams(session, net)
        if drained:
            # Every relay read its reply stream to the end: its connections went back to the pools for reuse.
            assert (completed, aborted) == (9, 0)
        else:
            assert aborted > 0


async def test_an_unfinished_reply_cancels_every_path_at_once() -> None:
    async with LocalNetwork(relays=3, handler=slow_counter) as net, aiohttp.ClientSession() as session:
        paths = [select_paths(net.descriptors(), 1, 3)[0], []]
        stream = send_request(session, b"100", paths, net.destination, ClientSettings(n=2, k=2))
        assert await anext(stream) == b"[0]"
        await stream.aclose()  # the caller gave up mid-reply: nothing is drained, the paths are closed now
        await net.settle(timeout_s=2.0)
        completed, aborted = await _relay_streams(session, net)
        assert completed == 0 and aborted > 0


@pytest.mark.parametrize("interval_s", [0.0, 0.05])
async def test_the_model_node_batches_reply_pieces_per_flush_interval(interval_s: float) -> None:
    template = OverlayConfig(x25519_secret=secrets.token_bytes(32), reply_flush_interval_s=interval_s)
    async with (
        LocalNetwork(relays=3, handler=slow_counter, template=template) as net,
        aiohttp.ClientSession() as session,
    ):
        paths = [select_paths(net.descriptors(), 1, 3)[0], [], []]
        pieces = [p async for p in send_request(session, b"20", paths, net.destination, ClientSettings(n=3, k=2))]
        assert b"".join(pieces) == b"".join(b"[%d]" % i for i in range(20))
        if interval_s == 0:
            assert len(pieces) == 20  # one sealed chunk per piece the handler yielded
        else:
            assert pieces[0] == b"[0]" and len(pieces) < 20  # the first at once, the rest batched


async def test_the_client_tells_a_first_hop_refusal_from_a_failure_behind_it() -> None:
    async with LocalNetwork(relays=12, handler=reversing_handler) as net, aiohttp.ClientSession() as session:
        paths = select_paths(net.descriptors(), 4, 3)
        net.node_at(paths[0][0].endpoint).overlay[keys.RELAY_STATE].draining = True  # answers 503 itself
        await net.node_at(paths[1][1].endpoint).stop()  # path 1's first hop answers 502 upstream_failed
        with pytest.raises(ReplyIncomplete) as info:
            async with asyncio.timeout(10):
                await _collect(send_request(session, b"x", paths, net.destination))
        assert sorted(info.value.failed_early) == [0, 1] and info.value.first_hop_failed == (0,)


async def _lying_relay(
    session: aiohttp.ClientSession, held: list[asyncio.Task[None]], peers: StaticPeerDirectory
) -> tuple[web.AppRunner, Peer]:
    """A misbehaving relay: it peels and forwards the packet (keeping the next hop's answer open) but tells the
    previous hop 502 ``upstream_failed`` at once, so the client counts a failure whose clove did arrive."""
    key = OnionKey(secrets.token_bytes(32))

    async def keep(url: str, packet: bytes) -> None:
        async with session.post(url, data=packet) as response:
            await response.read()

    async def handler(request: web.Request) -> web.Response:
        peeled = peel(await request.read(), keyring(key))
        assert isinstance(peeled, PeeledForward)
        peer = await peers.resolve(peeled.next_node)
        assert peer is not None
        held.append(asyncio.create_task(keep(peer.endpoint + "/overlay/v1/onion", peeled.packet)))
        await asyncio.sleep(0)
        body = {"error": {"message": "lie", "type": "server_error", "param": None, "code": "upstream_failed"}}
        return web.json_response(body, status=502)

    app = web.Application()
    app.router.add_post("/overlay/v1/onion", handler)
    runner, endpoint = await serve_ephemeral(app)
    return runner, Peer(node_id=secrets.token_bytes(20), endpoint=endpoint, public_key=key.public)


async def test_a_request_that_looked_hopeless_is_still_read_once_a_path_answers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # n=3, k=2: two relays lie (502) after forwarding their cloves, so the client counts 2 > n - k early failures;
    # but the model node rebuilt the request from them and answers on the direct path, which the client must read.
    held: list[asyncio.Task[None]] = []
    async with (
        LocalNetwork(relays=0, handler=slow_counter) as net,
        aiohttp.ClientSession() as session,
        aiohttp.ClientSession() as liars_session,
    ):
        liars = [await _lying_relay(liars_session, held, net.peers) for _ in range(2)]
        try:
            paths = [
                [
                    RelayDescriptor(
                        node_id="0x" + hop.node_id.hex(),
                        operator=f"op{i}",
                        endpoint=hop.endpoint,
                        public_key=hop.public_key,
                    )
                ]
                for i, (_, hop) in enumerate(liars)
            ]
            settings = ClientSettings(n=3, k=2, evidence_window_s=0.5)
            with caplog.at_level(logging.INFO, logger="node.overlay._client"):
                reply = await _collect(send_request(session, b"3", [*paths, []], net.destination, settings))
            assert reply == b"[0][1][2]"
            assert caplog.text.count("path rejected with HTTP 502") == 2  # both lies were counted as failures
        finally:
            for task in held:
                task.cancel()
            await asyncio.gather(*held, return_exceptions=True)
            for runner, _ in liars:
                await runner.cleanup()
