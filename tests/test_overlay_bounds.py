"""Each bound on what a peer can hold or burn, proved on live aiohttp servers on 127.0.0.1: a trickling next hop
frees the relay's slot, one crafted clove costs a constant number of combines, lone cloves from one source cannot
fill the message table or block honest messages, and a reply whose every path is gone is cancelled in the engine."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Sequence

import aiohttp
import pytest
from aiohttp import web

from node.inference import EngineStats, GenerationChunk, GenerationRequest, ScoreResult
from node.overlay import CompletionRequest, OverlayConfig, complete, keys, send_request
from node.overlay import _receiver as receiver_module
from node.overlay._completion import completion_handler
from node.overlay._localnet import LocalNetwork, LocalNode, serve_ephemeral, start_node
from node.overlay._peers import Peer, StaticPeerDirectory
from node.overlay._receiver import MAX_COMBINE_ATTEMPTS, CloveReceiver
from node.privacy import Clove, Envelope, Hop, build_onion, combine, public_key, split
from node.privacy._constants import FRAME_LEN_BYTES, REPLY_FRAME_BODY
from planetserve import ModelId

ONION = "/overlay/v1/onion"


async def echo(request: bytes) -> AsyncIterator[bytes]:
    yield b"echo:" + request


async def _post(session: aiohttp.ClientSession, node: LocalNode, clove: bytes) -> tuple[int, bytes]:
    """POST one clove straight to the model node; the status and the whole body."""
    packet = build_onion([node.hop()], clove).packet
    async with session.post(node.endpoint + ONION, data=packet) as response:
        return response.status, await response.read()


def _receiver(net: LocalNetwork) -> CloveReceiver:
    assert net.model is not None
    return net.model.overlay[keys.RECEIVER]


async def _until(predicate: object, timeout_s: float = 5.0) -> None:
    assert callable(predicate)
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_a_next_hop_that_trickles_bytes_after_200_frees_the_relay_slot_within_the_idle_timeout() -> None:
    async def trickle(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse()
        await response.prepare(request)
        # A well-formed frame announced, then its body one byte per 50 ms (about 26 s in all): never idle long
        # enough for a per-read timeout, so only a per-frame deadline ends it.
        await response.write(REPLY_FRAME_BODY.to_bytes(FRAME_LEN_BYTES, "big"))
        for _ in range(REPLY_FRAME_BODY):
            await asyncio.sleep(0.05)
            await response.write(b"\x00")
        return response

    app = web.Application()
    app.router.add_post(ONION, trickle)
    runner, endpoint = await serve_ephemeral(app)
    config = OverlayConfig(x25519_secret=secrets.token_bytes(32), idle_timeout_s=0.5, circuit_lifetime_s=60)
    # The trickler is a registered node (in the relay's view of the registry): relays dial no one else.
    hop = Hop(node_id=secrets.token_bytes(20), public_key=public_key(secrets.token_bytes(32)))
    peers = StaticPeerDirectory([Peer(node_id=hop.node_id, endpoint=endpoint, public_key=hop.public_key)])
    relay = await start_node("relay", config, peers=peers)
    try:
        packet = build_onion([relay.hop(), hop], b"clove").packet
        loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession() as session, session.post(relay.endpoint + ONION, data=packet) as response:
            assert response.status == 200
            started = loop.time()
            async with asyncio.timeout(10):
                await response.read()  # the relay ends the stream
            held = loop.time() - started
        await _until(lambda: relay.overlay[keys.RELAY_STATE].inflight == 0)
        assert held < 3.0, f"the relay held the slot {held:.1f} s"
        assert relay.overlay[keys.METRICS].streams_aborted == 1
    finally:
        await relay.stop()
        await runner.cleanup()


async def _post_in_order(
    session: aiohttp.ClientSession, node: LocalNode, cloves: list[bytes]
) -> list[asyncio.Task[tuple[int, bytes]]]:
    """Start one POST per clove, each once the previous one has been taken in, so arrival order is list order."""
    metrics = node.overlay[keys.METRICS]
    tasks = []
    for i, clove in enumerate(cloves):
        tasks.append(asyncio.create_task(_post(session, node, clove)))
        await _until(lambda i=i: metrics.requests > i)
        await asyncio.sleep(0.02)  # from the request's start to its clove in the table: no wait but the body read
    return tasks


def _tampered(clove: Clove) -> bytes:
    bad = bytearray(clove.to_bytes())
    bad[-1] ^= 0x01  # a well-formed clove whose fragment is wrong: only authentication can tell
    return bytes(bad)


@pytest.mark.parametrize("bad_positions", [(3,), (1, 4)])
async def test_crafted_bad_cloves_cost_at_most_a_constant_number_of_combine_attempts(
    monkeypatch: pytest.MonkeyPatch, bad_positions: tuple[int, ...]
) -> None:
    calls = 0

    def counting_combine(cloves: Sequence[Clove]) -> bytes:
        nonlocal calls
        calls += 1
        return combine(cloves)

    monkeypatch.setattr(receiver_module, "combine", counting_combine)
    async with LocalNetwork(relays=0, handler=echo) as net, aiohttp.ClientSession() as session:
        assert net.model is not None
        key = secrets.token_bytes(32)
        cloves = split(Envelope(reply_key=key, body=secrets.token_bytes(4096)).to_bytes(), 16, 8)
        wire = [_tampered(c) if i in bad_positions else c.to_bytes() for i, c in enumerate(cloves)]
        tasks = await _post_in_order(session, net.model, wire)
        async with asyncio.timeout(10):
            results = await asyncio.gather(*tasks)
    assert calls <= MAX_COMBINE_ATTEMPTS == 2
    # The message is given up: every path is answered at once (not after the assembly timeout), none with a reply.
    assert all(status != 200 for status, _ in results)


async def test_a_bad_first_clove_is_outlived_by_the_second_attempt() -> None:
    async with LocalNetwork(relays=0, handler=echo) as net, aiohttp.ClientSession() as session:
        assert net.model is not None
        cloves = split(Envelope(reply_key=secrets.token_bytes(32), body=b"hello").to_bytes(), 4, 3)
        wire = [_tampered(cloves[0]), *(c.to_bytes() for c in cloves[1:])]
        tasks = await _post_in_order(session, net.model, wire)
        results = await asyncio.gather(*tasks)
        assert [status for status, _ in results[1:]] == [200, 200, 200]
        assert _receiver(net).combine_attempts == 2


def _lone_clove() -> bytes:
    return split(Envelope(reply_key=bytes(32), body=b"x").to_bytes(), 3, 2)[0].to_bytes()


async def test_one_source_keeps_at_most_its_quota_of_incomplete_messages() -> None:
    template = OverlayConfig(x25519_secret=secrets.token_bytes(32), max_incomplete_per_source=4, max_messages=64)
    async with LocalNetwork(relays=0, handler=echo, template=template) as net, aiohttp.ClientSession() as session:
        assert net.model is not None
        tasks = [asyncio.create_task(_post(session, net.model, _lone_clove())) for _ in range(10)]
        await _until(lambda: net.model is not None and net.model.overlay[keys.METRICS].delivered == 10)
        await _until(lambda: sum(t.done() for t in tasks) == 6)  # the evicted ones are answered at once
        assert len(_receiver(net)) == 4 and _receiver(net).incomplete("127.0.0.1") == 4
        assert [t.result()[0] for t in tasks if t.done()] == [503] * 6
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_lone_cloves_filling_the_message_table_do_not_block_honest_messages() -> None:
    # The quota is out of the way here: the table itself is full of one flooder's lone cloves.
    template = OverlayConfig(x25519_secret=secrets.token_bytes(32), max_messages=8, max_incomplete_per_source=100)
    async with LocalNetwork(relays=0, handler=echo, template=template) as net, aiohttp.ClientSession() as session:
        assert net.model is not None
        flood = [asyncio.create_task(_post(session, net.model, _lone_clove())) for _ in range(8)]
        await _until(lambda: len(_receiver(net)) == 8)
        for i in range(5):
            body = b"honest %d" % i
            reply = b"".join([p async for p in send_request(session, body, [[]] * 4, net.destination)])
            assert reply == b"echo:" + body
        for task in flood:
            task.cancel()
        await asyncio.gather(*flood, return_exceptions=True)


class _SlowEngine:
    """The completion handler's direct neighbour: yields a token every 20 ms for 10 s and records aborts."""

    model_id = ModelId("0x" + "ab" * 32)

    def __init__(self) -> None:
        self.aborted: list[str] = []
        self.started: list[str] = []

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        self.started.append(request.request_id)
        for i in range(500):
            await asyncio.sleep(0.02)
            yield GenerationChunk(
                request_id=request.request_id,
                token_ids=(i,),
                logprobs=(0.0,),
                text="t",
                finish_reason=None,
                prompt_tokens=1,
                completion_tokens=i + 1,
                cached_tokens=0,
            )

    async def abort(self, request_id: str) -> bool:
        self.aborted.append(request_id)
        return True

    async def score(self, prompt: object, completion: object) -> ScoreResult:
        raise NotImplementedError

    def stats(self) -> EngineStats:
        raise NotImplementedError

    async def check_health(self) -> bool:
        return True

    async def close(self) -> None:
        return None


async def test_the_engine_request_is_aborted_when_every_reply_path_is_gone() -> None:
    engine = _SlowEngine()
    async with LocalNetwork(relays=0, handler=completion_handler(engine)) as net:
        request = CompletionRequest(model=engine.model_id, prompt="hi", max_tokens=500)
        async with aiohttp.ClientSession() as session:
            deltas = complete(session, request, [[]] * 4, net.destination)
            async for _ in deltas:
                break  # one delta, then the client goes away
            await deltas.aclose()  # type: ignore[attr-defined]  # complete returns an async generator
        await _until(lambda: bool(engine.aborted))
        assert engine.aborted == engine.started
        assert _receiver(net).replies_cancelled == 1
