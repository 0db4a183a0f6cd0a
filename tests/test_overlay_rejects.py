"""A live relay on 127.0.0.1 drops replays, oversized and malformed packets with a counted reason, and survives a
10,000-packet fuzz run without a crash."""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest

from node.overlay import OverlayConfig, keys
from node.overlay._localnet import LocalNode, start_node
from node.privacy import Hop, OnionKey, PeeledForward, RejectReason, build_onion, keyring, peel, public_key
from node.privacy._constants import MAX_PACKET, ONION_HEADER_LEN

ONION = "/overlay/v1/onion"


@pytest.fixture
async def relay() -> AsyncIterator[LocalNode]:
    node = await start_node("relay", OverlayConfig(x25519_secret=secrets.token_bytes(32)))
    try:
        yield node
    finally:
        await node.stop()


def _dead_endpoint() -> str:
    """A loopback port that was free a moment ago: connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _packet_for(node: LocalNode, clove: bytes = b"clove") -> bytes:
    path = [node.hop(), Hop(node_id=secrets.token_bytes(20), public_key=public_key(secrets.token_bytes(32)))]
    return build_onion(path, clove).packet


async def _metrics(session: aiohttp.ClientSession, node: LocalNode) -> dict[str, object]:
    async with session.get(node.endpoint + "/overlay/metrics") as response:
        data: dict[str, object] = await response.json()
    return data


async def test_replayed_packet_is_dropped_with_a_counted_reason(relay: LocalNode) -> None:
    packet = _packet_for(relay)
    async with aiohttp.ClientSession() as session:
        async with session.post(relay.endpoint + ONION, data=packet) as first:
            assert first.status == 400  # peeled and accepted; the next hop is no registered node, so not dialled
            assert (await first.json())["error"]["code"] == "unknown_next_hop"
        async with session.post(relay.endpoint + ONION, data=packet) as second:
            assert second.status == 409
            assert (await second.json())["error"]["code"] == "replay"
        rejected = (await _metrics(session, relay))["rejected"]
        assert isinstance(rejected, dict)
        assert rejected["replay"] == 1 and rejected["unknown_next_hop"] == 1


async def test_oversized_packets_are_dropped_before_reading(relay: LocalNode) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(relay.endpoint + ONION, data=bytes(MAX_PACKET + 1)) as response:
            assert response.status == 413
            assert (await response.json())["error"]["code"] == "oversized"

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the read limit must catch it
            for _ in range(MAX_PACKET // 65536 + 2):
                yield bytes(65536)

        async with session.post(relay.endpoint + ONION, data=chunked()) as response:
            assert response.status == 413
        rejected = (await _metrics(session, relay))["rejected"]
        assert isinstance(rejected, dict)
        assert rejected["oversized"] == 2


async def test_exit_packet_at_a_relay_only_node_is_rejected(relay: LocalNode) -> None:
    # A 2-hop path whose destination is the relay: peel the first hop here, send the exit layer to the relay.
    key = OnionKey(secrets.token_bytes(32))
    first = Hop(node_id=secrets.token_bytes(20), public_key=key.public)
    peeled = peel(build_onion([first, relay.hop()], b"c").packet, keyring(key))
    assert isinstance(peeled, PeeledForward)
    async with aiohttp.ClientSession() as session, session.post(relay.endpoint + ONION, data=peeled.packet) as response:
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "not_exit"


def _mutations(valid: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(8)
    data = bytearray(valid)
    if kind == 0:  # one flipped bit anywhere
        bit = rng.randrange(len(data) * 8)
        data[bit // 8] ^= 1 << (bit % 8)
    elif kind == 1:  # truncation
        data = data[: rng.randrange(len(data))]
    elif kind == 2:  # extension
        data += rng.randbytes(rng.randrange(1, 300))
    elif kind == 3:  # a random header byte replaced
        pos = rng.randrange(ONION_HEADER_LEN)
        data[pos] = (data[pos] + rng.randrange(1, 256)) % 256
    elif kind == 4:  # a burst of random bytes in the routing info
        pos = rng.randrange(50, 50 + 768 - 16)
        data[pos : pos + 16] = rng.randbytes(16)
    elif kind == 5:  # payload_len field changed
        data[818:822] = rng.randrange(2**32).to_bytes(4, "big")
    elif kind == 6:  # version/type
        data[rng.randrange(2)] ^= rng.randrange(1, 256)
    else:  # a packet of random bytes of the right length
        data = bytearray(rng.randbytes(len(valid)))
    if bytes(data) == valid:
        data[-1] ^= 0xFF
    return bytes(data)


async def test_fuzz_10000_random_and_mutated_packets_all_rejected_and_counted(relay: LocalNode) -> None:
    rng = random.Random(20260504)
    valid = [_packet_for(relay, rng.randbytes(rng.randrange(0, 700))) for _ in range(20)]
    packets: list[bytes] = []
    for i in range(10_000):
        if i % 4 == 0:
            packets.append(rng.randbytes(rng.choice([0, 1, 2, 50, 821, 822, 1078, rng.randrange(3000)])))
        else:
            packets.append(_mutations(rng.choice(valid), rng))
    statuses: dict[int, int] = {}
    codes: set[str] = set()
    known = {r.value for r in RejectReason}
    connector = aiohttp.TCPConnector(limit=16)
    async with aiohttp.ClientSession(connector=connector) as session:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        for p in packets:
            queue.put_nowait(p)

        async def worker() -> None:
            while not queue.empty():
                packet = queue.get_nowait()
                async with session.post(relay.endpoint + ONION, data=packet) as response:
                    statuses[response.status] = statuses.get(response.status, 0) + 1
                    body = await response.json()
                    codes.add(body["error"]["code"])

        async with asyncio.timeout(120):
            await asyncio.gather(*(worker() for _ in range(16)))
        snapshot = await _metrics(session, relay)
        async with session.get(relay.endpoint + "/overlay/healthz") as health:
            assert health.status == 200
    assert sum(statuses.values()) == 10_000
    assert set(statuses) <= {400, 409, 410, 413}, statuses
    assert codes <= known
    assert {"bad_mac", "too_short", "bad_length", "bad_version", "bad_type"} <= codes
    assert snapshot["rejected_total"] == 10_000
    assert snapshot["forwarded"] == 0
    assert len(relay.overlay[keys.RELAY_STATE].replay) == 0  # no forgery reached the replay cache


async def test_a_slow_sender_is_cut_off_with_a_counted_reason() -> None:
    config = OverlayConfig(x25519_secret=secrets.token_bytes(32), body_timeout_s=0.3)
    node = await start_node("relay", config)
    try:
        host, port = node.endpoint.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        head = f"POST {ONION} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 4000\r\n\r\n"
        writer.write(head.encode() + b"\x01" * 10)  # then nothing: a slowloris holding an in-flight slot
        await writer.drain()
        async with asyncio.timeout(5):
            status_line = await reader.readline()
        assert status_line.split()[1] == b"408"
        writer.close()
        async with aiohttp.ClientSession() as session:
            rejected = (await _metrics(session, node))["rejected"]
        assert isinstance(rejected, dict) and rejected["slow_body"] == 1
    finally:
        await node.stop()


async def test_a_client_that_trickles_header_bytes_is_cut_off() -> None:
    config = OverlayConfig(x25519_secret=secrets.token_bytes(32), header_timeout_s=0.5)
    node = await start_node("relay", config)
    try:
        host, port = node.endpoint.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        head = f"POST {ONION} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 4000\r\nX-Pad: {'a' * 400}\r\n\r\n"
        loop = asyncio.get_running_loop()
        started = loop.time()
        closed_after: float | None = None
        for byte in head.encode()[:-4]:  # never the blank line: the request head is never complete
            writer.write(bytes([byte]))
            await asyncio.sleep(0.01)
            if reader.at_eof() or writer.is_closing():
                closed_after = loop.time() - started
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.001):
                    if await reader.read(1) == b"":
                        closed_after = loop.time() - started
                        break
        writer.close()
        assert closed_after is not None, "the server kept a connection that sent header bytes for seconds"
        assert closed_after < 2.0
        assert node.overlay[keys.RELAY_STATE].inflight == 0
    finally:
        await node.stop()
