"""What a stranger can make an overlay node (relay or model node) or a client hold or do, on real aiohttp servers on
127.0.0.1: a previous hop that stops reading its reply stream, a registered endpoint that smuggles a path, a heartbeat
that never ends, and a model node whose reply line is nested deep enough to crash the reader.

Bounds are lowered through ``OverlayConfig`` so that each test runs in seconds; each test says what it saw before
the bound existed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import gzip
import secrets
import socket
import sys
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from aiohttp import web
from eth_account import Account

from node.client import OverlayTransport
from node.inference import EngineStats, GenerationChunk, GenerationRequest, ScoreResult
from node.overlay import CompletionError, CompletionRequest, OverlayConfig, complete, keys
from node.overlay._heartbeat import HEARTBEAT_PATH, HeartbeatPublisher
from node.overlay._localnet import LocalNetwork, serve_ephemeral, start_node
from node.overlay._peers import Peer, StaticPeerDirectory
from node.overlay._serve import create_model_app
from node.privacy import Clove, Envelope, Hop, InvalidPrivacyParam, RelayDescriptor, build_onion, public_key, split
from planetserve import ModelId

ONION = "/overlay/v1/onion"


async def _flood(_request: bytes) -> AsyncIterator[bytes]:
    """A reply far larger than any socket buffer (it stops at the node's backlog bound, about 4 MiB)."""
    while True:
        yield b"r" * 65536
        await asyncio.sleep(0)


async def _until(predicate: object, timeout_s: float) -> None:
    assert callable(predicate)
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def _non_reader(endpoint: str, packet: bytes) -> AsyncIterator[None]:
    """POST ``packet`` over a socket with a 4 KiB receive buffer and never read the answer."""
    host, port = endpoint.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    _reader, writer = await asyncio.open_connection(sock=sock)
    try:
        head = f"POST {ONION} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(packet)}\r\n\r\n"
        writer.write(head.encode() + packet)
        await writer.drain()
        yield
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def _cloves(n: int, k: int) -> list[bytes]:
    envelope = Envelope(reply_key=secrets.token_bytes(32), body=b"any request")
    return [c.to_bytes() for c in split(envelope.to_bytes(), n, k)]


async def test_a_path_that_stops_reading_its_reply_frees_the_model_nodes_slot_within_the_idle_timeout() -> None:
    # Before, only waiting for the next frame was timed, not writing it: once the socket buffers were full the
    # write waited for good, and each such path held one of the node's max_inflight slots for ever.
    template = OverlayConfig(x25519_secret=secrets.token_bytes(32), idle_timeout_s=0.5, reply_timeout_s=60)
    async with LocalNetwork(relays=0, handler=_flood, template=template) as net:
        assert net.model is not None
        node = net.model
        state = node.overlay[keys.RELAY_STATE]
        metrics = node.overlay[keys.METRICS]
        async with contextlib.AsyncExitStack() as stack:
            for clove in _cloves(3, 2)[:2]:
                await stack.enter_async_context(_non_reader(node.endpoint, build_onion([node.hop()], clove).packet))
            await _until(lambda: metrics.delivered == 2, 5)
            await _until(lambda: state.inflight == 0, 8)
            assert metrics.streams_aborted == 2


async def test_a_previous_hop_that_stops_reading_frees_the_relays_slot_within_the_idle_timeout() -> None:
    # Before, the relay timed each frame's read from the next hop but not its write to the previous hop: a client
    # that stopped reading held the relay's slot (and the model node's) for the whole circuit lifetime (900 s).
    template = OverlayConfig(
        x25519_secret=secrets.token_bytes(32), idle_timeout_s=0.5, circuit_lifetime_s=60, reply_timeout_s=60
    )
    async with LocalNetwork(relays=1, handler=_flood, template=template) as net:
        assert net.model is not None
        relay = net.relay_nodes[0]
        async with contextlib.AsyncExitStack() as stack:
            for clove in _cloves(3, 2)[:2]:
                packet = build_onion([relay.hop(), net.model.hop()], clove).packet
                await stack.enter_async_context(_non_reader(relay.endpoint, packet))
            await _until(lambda: relay.overlay[keys.METRICS].forwarded == 2, 5)
            await _until(lambda: relay.overlay[keys.RELAY_STATE].inflight == 0, 8)
            await _until(lambda: net.model is not None and net.model.overlay[keys.RELAY_STATE].inflight == 0, 8)
            assert relay.overlay[keys.METRICS].streams_aborted == 2


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://127.0.0.1:{port}/admin/reset#",  # the fragment swallows the /overlay/v1/onion suffix
        "http://127.0.0.1:{port}/admin/reset;",
        "http://user:secret@127.0.0.1:{port}",
        "http://127.0.0.1:{port}/admin",
        "http://127.0.0.1:{port} /x",
        "http://127.0.0.1:{port}\r\nX-Injected: 1",
        "http://",
        "http://:80",
    ],
    ids=["fragment", "params", "userinfo", "path", "space", "crlf", "no-host", "empty-host"],
)
async def test_a_registered_endpoint_that_is_not_a_bare_host_and_port_is_refused_and_never_dialled(
    endpoint: str,
) -> None:
    # Before, a peer's endpoint needed only to start with http:// and hold no "?": a registrant could append a path
    # and a "#", so that every relay forwarding to it POSTed to a path of its choosing (here /admin/reset) on any host.
    hits: list[str] = []

    async def record(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(status=404)

    internal = web.Application()
    internal.router.add_route("*", "/{tail:.*}", record)
    runner, url = await serve_ephemeral(internal)
    try:
        port = url.rsplit(":", 1)[1]
        evil = endpoint.format(port=port)
        hop_key = public_key(secrets.token_bytes(32))
        node_id = secrets.token_bytes(20)
        with pytest.raises(InvalidPrivacyParam):
            Peer(node_id=node_id, endpoint=evil, public_key=hop_key)
        with pytest.raises(InvalidPrivacyParam):
            RelayDescriptor(
                node_id="0x" + node_id.hex(), operator="0x" + node_id.hex(), endpoint=evil, public_key=hop_key
            )
        # The control: the same host as a bare host:port is a peer, and a relay forwarding to it does dial it.
        peers = StaticPeerDirectory([Peer(node_id=node_id, endpoint=url, public_key=hop_key)])
        relay = await start_node("relay", OverlayConfig(x25519_secret=secrets.token_bytes(32)), peers=peers)
        try:
            packet = build_onion([relay.hop(), Hop(node_id=node_id, public_key=hop_key)], b"clove").packet
            async with aiohttp.ClientSession() as session, session.post(relay.endpoint + ONION, data=packet) as reply:
                assert reply.status == 502
            assert hits == [ONION]
        finally:
            await relay.stop()
    finally:
        await runner.cleanup()


def test_bare_host_and_port_endpoints_stay_valid() -> None:
    key = public_key(secrets.token_bytes(32))
    for endpoint in ("http://127.0.0.1:8701", "http://relay.example.org:80", "http://[::1]:8701", "http://n1/"):
        Peer(node_id=secrets.token_bytes(20), endpoint=endpoint, public_key=key)


async def test_a_heartbeat_that_never_ends_is_given_up_within_the_fetch_deadline() -> None:
    # A registered model node (anyone with a stake) answers the heartbeat GET with a body it never finishes, a byte
    # every 50 ms: the client's fetch must end on its own deadline, not on the node's say-so.
    sent = 0

    async def endless(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            while True:
                await response.write(b" ")
                sent += 1
                await asyncio.sleep(0.05)
        return response

    app = web.Application()
    app.router.add_get(HEARTBEAT_PATH, endless)
    runner, endpoint = await serve_ephemeral(app)
    transport = OverlayTransport()
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        with pytest.raises((TimeoutError, aiohttp.ClientError)):
            async with asyncio.timeout(10):  # only the test's own guard: the fetch must end well before
                await transport.fetch_heartbeat(endpoint)
        took = loop.time() - started
    finally:
        await transport.close()
        await runner.cleanup()
    assert took < 5.0 and sent > 3  # it was still trickling when given up


@contextlib.contextmanager
def _production_recursion_limit() -> Iterator[None]:
    """The recursion limit a running client has: py_ecc (imported with web3) raises it to 100,000, so a recursive
    JSON decoder overflows the C stack (a segfault) before it raises RecursionError."""
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(max(before, 100_000))
    try:
        yield
    finally:
        sys.setrecursionlimit(before)


async def test_a_reply_line_nested_deep_enough_to_crash_a_recursive_decoder_is_a_bad_reply() -> None:
    # Before, the client parsed reply lines with json.loads: this line (150,000 "[", within the reply bound for 64
    # tokens) crashed the whole process, so a cheating model node could kill every verifier that audited it.
    async def nested(_request: bytes) -> AsyncIterator[bytes]:
        yield b"[" * 150_000 + b"\n"

    request = CompletionRequest(model=ModelId("0x" + "ab" * 32), prompt="hi", max_tokens=64)
    with _production_recursion_limit():
        async with LocalNetwork(relays=0, handler=nested) as net, aiohttp.ClientSession() as session:
            with pytest.raises(CompletionError) as caught:
                async for _ in complete(session, request, [[]] * 4, net.destination):
                    pass
    assert caught.value.code == "bad_reply"


@pytest.mark.parametrize(
    "headers",
    [{"X-Pad": "a" * 9000}, {f"X-H{i}": "v" for i in range(200)}, {"a" * 9000: "v"}],
    ids=["long-value", "many-headers", "long-name"],
)
async def test_oversized_request_heads_are_refused_without_taking_a_slot(headers: dict[str, str]) -> None:
    relay = await start_node("relay", OverlayConfig(x25519_secret=secrets.token_bytes(32)))
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(relay.endpoint + ONION, data=b"x", headers=headers) as response:
                assert 400 <= response.status < 500
            async with session.get(relay.endpoint + "/overlay/healthz") as health:
                assert health.status == 200
        assert relay.overlay[keys.RELAY_STATE].inflight == 0
        assert relay.overlay[keys.METRICS].requests == 1  # only the health check reached the application
    finally:
        await relay.stop()


async def test_a_compressed_body_that_inflates_past_the_packet_limit_is_refused_as_oversized() -> None:
    # 32 KB on the wire, 32 MiB inflated: the limit applies to what the body inflates to, as it inflates.
    bomb = gzip.compress(bytes(32 << 20), compresslevel=9)
    relay = await start_node("relay", OverlayConfig(x25519_secret=secrets.token_bytes(32)))
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        async with aiohttp.ClientSession() as session:
            headers = {"Content-Encoding": "gzip", "Content-Type": "application/octet-stream"}
            async with session.post(relay.endpoint + ONION, data=bomb, headers=headers) as response:
                assert response.status == 413
        assert loop.time() - started < 5.0
        assert relay.overlay[keys.METRICS].snapshot()["rejected"]["oversized"] == 1  # type: ignore[index]
    finally:
        await relay.stop()


class _SlowHealthEngine:
    """The model app's direct neighbour: an engine whose health check waits until ``release`` is set (like the
    openai-http engine's, which asks its upstream server) and counts its calls; it serves nothing."""

    model_id = ModelId("0x" + "cd" * 32)

    def __init__(self) -> None:
        self.health_checks = 0
        self.release = asyncio.Event()
        self.release.set()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        raise NotImplementedError
        yield  # pragma: no cover - makes this an async generator

    async def abort(self, request_id: str) -> bool:
        return False

    async def score(self, prompt: object, completion: object) -> ScoreResult:
        raise NotImplementedError

    def stats(self) -> EngineStats:
        return EngineStats(
            model_id=self.model_id,
            queued_requests=0,
            running_requests=0,
            queued_tokens=0,
            cached_prefix_hashes=(),
            cache_bytes=0,
            prefill_tokens_computed=0,
            prefill_tokens_cached=0,
            tokens_per_second=0.0,
        )

    async def check_health(self) -> bool:
        self.health_checks += 1
        async with asyncio.timeout(30):
            await self.release.wait()
        return True

    async def close(self) -> None:
        return None


async def test_a_readiness_flood_neither_floods_the_engines_health_check_nor_takes_the_packet_slots() -> None:
    # Before, every GET /overlay/readyz ran the engine's health check (for openai-http, one request upstream) and held
    # one of the in-flight slots meanwhile: 40 concurrent GETs made 40 upstream requests and, with max_inflight 8,
    # got every packet refused as overloaded.
    engine = _SlowHealthEngine()
    engine.release.clear()  # every check waits until the whole flood is in
    config = OverlayConfig(x25519_secret=secrets.token_bytes(32), role="model", max_inflight=8)
    app = create_model_app(config, engine)  # type: ignore[arg-type]  # a fake with the protocol's methods
    metrics = app[keys.OVERLAY_APP][keys.METRICS]
    runner, endpoint = await serve_ephemeral(app)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

            async def ready() -> int:
                async with session.get(endpoint + "/overlay/readyz") as response:
                    return response.status

            flood = [asyncio.create_task(ready()) for _ in range(40)]
            await _until(lambda: metrics.requests == 40, 10)  # all 40 in their handlers, waiting on the check
            async with session.post(endpoint + ONION, data=b"junk") as response:
                assert (await response.json())["error"]["code"] != "overloaded"
            engine.release.set()
            assert await asyncio.gather(*flood) == [200] * 40
        assert engine.health_checks == 1  # one check shared by the whole flood
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"], ids=["literal", "name"])
async def test_a_relay_told_to_dial_only_public_addresses_never_connects_to_a_registered_loopback_endpoint(
    host: str,
) -> None:
    # A registrant's endpoint may name any host: by default (a network on one host) the relay dials it, as the
    # control shows; with dial_private_addresses=False it refuses at connect time, for a literal address and for a
    # name that resolves to one alike, so the service on the relay's own host sees no connection.
    accepted = 0

    async def count(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        writer.close()

    internal = await asyncio.start_server(count, "127.0.0.1", 0)
    port = internal.sockets[0].getsockname()[1]
    node_id, hop_key = secrets.token_bytes(20), public_key(secrets.token_bytes(32))
    peers = StaticPeerDirectory([Peer(node_id=node_id, endpoint=f"http://{host}:{port}", public_key=hop_key)])
    try:
        for dial_private, expected in ((False, 0), (True, 1)):
            config = OverlayConfig(x25519_secret=secrets.token_bytes(32), dial_private_addresses=dial_private)
            relay = await start_node("relay", config, peers=peers)
            try:
                packet = build_onion([relay.hop(), Hop(node_id=node_id, public_key=hop_key)], b"clove").packet
                async with (
                    aiohttp.ClientSession() as session,
                    session.post(relay.endpoint + ONION, data=packet) as reply,
                ):
                    assert reply.status == 502
                    assert (await reply.json())["error"]["code"] == "upstream_failed"
            finally:
                await relay.stop()
            assert min(accepted, 1) == expected, f"dial_private_addresses={dial_private}: {accepted} connections"
    finally:
        internal.close()
        await internal.wait_closed()


def test_only_global_addresses_count_as_public() -> None:
    from node.overlay._dialing import public_only_socket  # the factory aiohttp calls with each address to dial

    for private in ("127.0.0.1", "10.1.2.3", "192.168.0.1", "169.254.169.254", "100.64.0.1", "0.0.0.0"):
        with pytest.raises(OSError):
            public_only_socket((socket.AF_INET, socket.SOCK_STREAM, 6, "", (private, 80)))
    for private6 in ("::1", "fe80::1", "fc00::1", "::ffff:127.0.0.1"):
        with pytest.raises(OSError):
            public_only_socket((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (private6, 80, 0, 0)))
    with public_only_socket((socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 80))) as sock:
        assert sock.family == socket.AF_INET  # created, not connected: nothing leaves this machine


async def test_an_assembled_message_keeps_no_clove_payloads_while_it_lingers() -> None:
    # Before, every clove of a message stayed in the table until the message was forgotten (30 s after its reply):
    # anyone can build valid cloves (the keys are public), so 256 messages of 16 cloves of 128 KiB held 512 MiB of a
    # model node's memory, even where payment is refused (the voucher is checked only once the request is rebuilt).
    async with LocalNetwork(relays=0, handler=_short_reply) as net, aiohttp.ClientSession() as session:
        assert net.model is not None
        node = net.model
        envelope = Envelope(reply_key=secrets.token_bytes(32), body=secrets.token_bytes(64 * 1024))
        cloves = [c.to_bytes() for c in split(envelope.to_bytes(), 16, 2)]

        async def post(clove: bytes) -> int:
            async with session.post(node.endpoint + ONION, data=build_onion([node.hop()], clove).packet) as reply:
                await reply.read()
                return reply.status

        assert await asyncio.gather(*(post(c) for c in cloves)) == [200] * 16
        receiver = node.overlay[keys.RECEIVER]
        assert len(receiver) == 1  # the message lingers for late cloves...
        gc.collect()
        # type(), not isinstance(): isinstance reads ``__class__``, which some of torch's deprecated module proxies
        # answer with a FutureWarning (an error here) once torch is loaded in this process.
        held = [o for o in gc.get_objects() if type(o) is Clove]
        assert held == []  # ...without their payloads
        # A late clove with a known index but other content is still refused as inconsistent.
        forged = bytearray(cloves[5])
        forged[-1] ^= 1
        assert await post(bytes(forged)) == 400


async def _short_reply(_request: bytes) -> AsyncIterator[bytes]:
    yield b"ok"


async def test_packets_over_the_in_flight_bound_are_refused_at_once_and_the_slots_come_back() -> None:
    # Two slots, both held by senders that never finish their bodies: the third packet is refused at once (503
    # overloaded, not queued), and once the body timeout frees the slots, packets are taken again.
    config = OverlayConfig(x25519_secret=secrets.token_bytes(32), max_inflight=2, body_timeout_s=3.0)
    relay = await start_node("relay", config)
    host, port = relay.endpoint.removeprefix("http://").split(":")
    holders = []
    try:
        for _ in range(2):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(f"POST {ONION} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 4000\r\n\r\nx".encode())
            await writer.drain()
            holders.append((reader, writer))
        await _until(lambda: relay.overlay[keys.RELAY_STATE].inflight == 2, 5)
        async with aiohttp.ClientSession() as session:
            async with session.post(relay.endpoint + ONION, data=b"junk") as response:
                assert response.status == 503 and (await response.json())["error"]["code"] == "overloaded"
            for reader, _writer in holders:
                async with asyncio.timeout(5):
                    assert (await reader.readline()).split()[1] == b"408"
            await _until(lambda: relay.overlay[keys.RELAY_STATE].inflight == 0, 5)
            async with session.post(relay.endpoint + ONION, data=b"junk") as response:
                assert response.status == 400  # read and rejected on its merits, not refused for lack of a slot
    finally:
        for _reader, writer in holders:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await relay.stop()


async def test_a_heartbeat_flood_is_served_from_one_signature() -> None:
    # The heartbeat is public and signed with the operator's key: 200 GETs at once cost one signature, not 200.
    engine = _SlowHealthEngine()
    publisher = HeartbeatPublisher(
        account=Account.create(), model_id=engine.model_id, stats=engine.stats, interval_s=60.0
    )
    config = OverlayConfig(x25519_secret=secrets.token_bytes(32), role="model")
    app = create_model_app(config, engine, heartbeat=publisher)  # type: ignore[arg-type]  # a fake with the protocol's methods
    runner, endpoint = await serve_ephemeral(app)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

            async def fetch() -> bytes:
                async with session.get(endpoint + HEARTBEAT_PATH) as response:
                    assert response.status == 200
                    return await response.read()

            bodies = await asyncio.gather(*(fetch() for _ in range(200)))
        assert len(set(bodies)) == 1  # one heartbeat (one seq, one signature) for the whole flood
    finally:
        await runner.cleanup()


def test_ps_node_serve_dials_private_addresses_by_default_only_when_it_listens_privately() -> None:
    from node.overlay._dialing import dial_private_by_default

    for private in ("127.0.0.1", "localhost", "::1", "[::1]", "10.0.0.5", "192.168.1.2", "fd00::1"):
        assert dial_private_by_default(private), private
    # Every interface, a public address or a public name: the node serves the internet, so registrants must not be
    # able to point it at its own network.
    for public in ("0.0.0.0", "::", "93.184.216.34", "2001:4860:4860::8888", "relay.example.org"):
        assert not dial_private_by_default(public), public
