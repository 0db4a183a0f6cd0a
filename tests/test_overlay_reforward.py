"""Re-forwarding by an overloaded model node (protocol §10.5), live: two model nodes with real torch engines and
signed heartbeats, six relays, all real aiohttp servers on 127.0.0.1; the client sends over 4 onion paths of 3 relays
and knows only node A, so whatever B serves reached the client through A, on the client's own paths (the network
of ``tests/_reforward_net.py``, which closes all it opens however a test ends).

What is proven: A over its queue bound hands a request to an idle peer B and the client gets B's whole answer (the
engine's own greedy output); a request already re-forwarded is never re-forwarded again, even when B is over its
bound too and A looks idle to it; a client marking its own request ``forwarded`` only loses the option; a peer that
fails before answering leaves the request to A, which serves it; re-forwards in flight are bounded; a peer whose
heartbeat is forged is never chosen; paid: the client pays A at A's price, A pays B from its own wallet on its own
channel exactly what B charged, and without a wallet A never re-forwards to a charging peer; the decisions are
counted at ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from eth_account import Account

from ledger import Indexer, dev_account
from node.inference import GenerationRequest, SamplingParams
from node.overlay import CompletionError, CompletionRequest, Directory, ModelNode, SessionClosed
from node.overlay._heartbeat import HEARTBEAT_PATH, Heartbeat, sign_heartbeat
from node.overlay._reforward import ReforwardConfig, Reforwarder
from node.overlay._serve import registry_directory_source
from node.testing import serve_ephemeral
from planetserve import ModelId
from tests._reforward_net import (
    A_WALLET,
    BOUND,
    CLIENT,
    NODE_A,
    NODE_B,
    PROMPT,
    REQUEST_TIMEOUT_S,
    ReforwardNet,
    Side,
    assert_a_paid_b,
    assert_client_paid_a,
    greedy,
    metrics_text,
    paid_reforward,
    reforward_net,
    request,
)
from tests.fixtures.chain import ChainEnv

LONG = 400
LONG_PROMPTS = ("the quick brown fox", "hello there, ", "and runs far away ", "a b c d e f ")


async def _served_by_a_alone(net: ReforwardNet, a: Side, b: Side) -> None:
    """A is over its bound, yet B does not qualify as its peer: A serves the client's request itself."""
    await a.make_busy()
    async with net.client(a) as client, asyncio.timeout(REQUEST_TIMEOUT_S):
        result = await client.complete(request(a))
    assert a.reforwarder is not None and dict(a.reforwarder.outcomes) == {"no_peer": 1}
    assert b.served.count == 0 and a.served.count == 1
    assert result.finish_reason in {"stop", "length"}


async def test_an_overloaded_node_re_forwards_to_an_idle_peer_and_the_client_gets_its_whole_answer(
    tiny_model_dir: Path,
) -> None:
    async with reforward_net(tiny_model_dir) as net:
        a = await net.side(reforward=BOUND)
        b = await net.side(reforward=BOUND)
        await a.make_busy()
        async with net.client(a) as client, asyncio.timeout(REQUEST_TIMEOUT_S):
            result = await client.complete(request(a))
        assert a.reforwarder is not None and b.reforwarder is not None
        assert dict(a.reforwarder.outcomes) == {"served_by_peer": 1}
        assert b.served.count == 1 and a.served.count == 1  # B generated it; A relayed it (and counted it as served)
        assert not b.reforwarder.outcomes  # B was under its bound: it just served
        await a.idle()
        assert result.token_ids == await greedy(b.engine)
        assert result.finish_reason in {"stop", "length"}
        assert 'planetserve_reforwards_total{outcome="served_by_peer"} 1.0' in await metrics_text(a)


async def test_a_re_forwarded_request_is_never_re_forwarded_again(tiny_model_dir: Path) -> None:
    async with reforward_net(tiny_model_dir) as net:
        # Both over their bound, both claiming to be idle: each looks like the perfect peer to the other.
        a = await net.side(reforward=BOUND, lie=True)
        b = await net.side(reforward=BOUND, lie=True)
        await a.make_busy()
        await b.make_busy()
        async with net.client(a) as client, asyncio.timeout(REQUEST_TIMEOUT_S):
            result = await client.complete(request(a))
        assert a.reforwarder is not None and b.reforwarder is not None
        assert dict(a.reforwarder.outcomes) == {"served_by_peer": 1}
        assert dict(b.reforwarder.outcomes) == {"already_forwarded": 1}  # B served it itself, queued behind its load
        assert b.served.count == 1
        assert result.finish_reason in {"stop", "length"}


async def test_a_client_marking_its_request_forwarded_only_loses_the_option(tiny_model_dir: Path) -> None:
    async with reforward_net(tiny_model_dir) as net:
        a = await net.side(reforward=BOUND)
        b = await net.side(reforward=BOUND)
        await a.make_busy()
        async with net.client(a) as client, asyncio.timeout(REQUEST_TIMEOUT_S):
            result = await client.complete(request(a, forwarded=True))
        assert a.reforwarder is not None
        assert dict(a.reforwarder.outcomes) == {"already_forwarded": 1}
        assert b.served.count == 0 and a.served.count == 1
        await a.idle()
        assert result.token_ids == await greedy(a.engine)


async def test_a_peer_that_fails_before_answering_leaves_the_request_to_the_node(tiny_model_dir: Path) -> None:
    async with reforward_net(tiny_model_dir) as net:
        # A keeps B's last heartbeat for a minute: B will look idle (and alive) after it died.
        trusting = dataclasses.replace(BOUND, heartbeat_max_age_s=60.0)
        a = await net.side(reforward=trusting, refresh_s=60.0)
        b = await net.side(reforward=BOUND)
        await a.make_busy()
        async with net.client(a) as client, asyncio.timeout(REQUEST_TIMEOUT_S):
            await client.complete(request(a))
            assert a.reforwarder is not None and a.reforwarder.outcomes["served_by_peer"] == 1
            await b.node.stop()
            result = await client.complete(request(a))
        assert a.reforwarder.outcomes["peer_failed"] == 1
        assert a.served.count == 2 and b.served.count == 1
        await a.idle()
        assert result.token_ids == await greedy(a.engine)


async def test_a_peer_dying_mid_reply_ends_the_reply_with_reforward_failed(tiny_model_dir: Path) -> None:
    async with reforward_net(tiny_model_dir) as net:
        a = await net.side(reforward=BOUND)
        b = await net.side(reforward=None)
        # A prompt whose greedy answer runs long (a fresh tiny model may stop some early): long enough that B cannot
        # finish it within its stop's grace period, whatever the machine's speed.
        prompt, length = "", 0
        for candidate in LONG_PROMPTS:
            params = SamplingParams(max_tokens=LONG, temperature=0.0)
            probe = GenerationRequest(request_id=f"probe-{len(candidate)}", prompt=candidate, params=params)
            tokens = [t async for chunk in b.engine.generate(probe) for t in chunk.token_ids]
            if len(tokens) > length:
                prompt, length = candidate, len(tokens)
            if length == LONG:
                break
        assert length >= LONG // 2
        await a.make_busy()
        deltas = 0
        async with net.client(a) as client, asyncio.timeout(REQUEST_TIMEOUT_S):
            long = CompletionRequest(model=a.engine.model_id, prompt=prompt, max_tokens=LONG, temperature=0.0)
            with pytest.raises(CompletionError) as failed:
                async for _delta in client.stream(long):
                    deltas += 1
                    if deltas == 1:
                        await b.node.stop()  # B crashes while A relays its reply
        assert failed.value.code == "reforward_failed"
        assert a.reforwarder is not None and dict(a.reforwarder.outcomes) == {"broken": 1}


async def test_re_forwards_in_flight_are_bounded(tiny_model_dir: Path) -> None:
    async with reforward_net(tiny_model_dir) as net:
        one = dataclasses.replace(BOUND, max_concurrent=1)
        a = await net.side(reforward=one)
        # B looks idle but answers slowly (its own queue): a re-forward holds A's one slot for a second or more, so
        # the client's three requests, sent at once, find it taken.
        b = await net.side(reforward=one, lie=True)
        await a.make_busy()
        await b.make_busy()
        async with net.client(a) as client, asyncio.timeout(REQUEST_TIMEOUT_S):
            results = await asyncio.gather(*(client.complete(request(a, max_tokens=32)) for _ in range(3)))
        assert a.reforwarder is not None
        assert a.reforwarder.peak_in_flight == 1
        assert a.reforwarder.outcomes["served_by_peer"] >= 1 and a.reforwarder.outcomes["busy"] >= 1
        assert sum(a.reforwarder.outcomes.values()) == 3
        assert b.served.count == a.reforwarder.outcomes["served_by_peer"]
        assert all(r.finish_reason in {"stop", "length"} for r in results)


async def test_a_peer_whose_heartbeat_is_forged_is_never_re_forwarded_to(tiny_model_dir: Path) -> None:
    async with reforward_net(tiny_model_dir) as net:
        a = await net.side(reforward=BOUND)
        b = await net.side(reforward=None, forger=Account.create())
        await _served_by_a_alone(net, a, b)


async def test_a_peer_heartbeat_arriving_in_several_segments_is_read_whole_and_accepted() -> None:
    """A heartbeat body need not arrive in one read (a slow link, a large cache summary): the node reads it to its
    end (bounded), not only what the first read returned."""
    operator = Account.create()
    model = ModelId.of("tiny-llama@v1")
    now_ms = int(time.time() * 1000)
    beat = Heartbeat(
        node=operator.address,
        model=str(model),
        seq=1,
        issued_at_ms=now_ms,
        queued_requests=0,
        running_requests=0,
        queued_tokens=0,
        ttft_ms_p50=0.0,
    )
    body = sign_heartbeat(beat, operator).model_dump_json().encode()

    async def heartbeat(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[:40])
        await asyncio.sleep(0.1)  # the rest in a later segment
        await response.write(body[40:])
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get(HEARTBEAT_PATH, heartbeat)
    runner, endpoint = await serve_ephemeral(app)
    peer = ModelNode(
        operator=operator.address, endpoint=endpoint, public_key=bytes(32), model_id=model, price_per_1k_tokens=0
    )
    reforwarder = Reforwarder(
        ReforwardConfig(operator=dev_account(NODE_A).address),
        lambda: asyncio.sleep(0, Directory(relays=(), model_nodes=(peer,))),
    )
    try:
        await reforwarder._refresh(peer)
        assert reforwarder._beats[peer.operator].latest == beat
    finally:
        await reforwarder.close()
        await runner.cleanup()


async def test_a_slow_registry_view_is_read_once_however_many_callers_give_up_waiting(
    chain: ChainEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each re-forward decision waits at most 5 s for the view; callers that give up must not each start another
    read (and another worker thread syncing the same index) while the first is still under way."""
    syncs: list[float] = []
    sync = Indexer.sync

    def slow_sync(self: Indexer, **kwargs: Any) -> Any:
        syncs.append(time.monotonic())
        time.sleep(0.6)  # a chain far behind, or slow to answer
        return sync(self, **kwargs)

    monkeypatch.setattr(Indexer, "sync", slow_sync)
    source = registry_directory_source(
        chain.rpc_url, chain.deployment_path, f"sqlite:///{tmp_path / 'index.sqlite'}", refresh_s=60
    )
    try:
        for _ in range(5):
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(source(), 0.05)
        view = await asyncio.wait_for(source(), 30)
        assert len(syncs) == 1 and isinstance(view, Directory)
        assert await source() is view  # within refresh_s: served from memory
    finally:
        source.close()


async def test_a_paid_request_is_re_forwarded_to_a_charging_peer_paid_from_the_nodes_own_wallet(
    chain: ChainEnv, tiny_model_dir: Path, tmp_path: Path
) -> None:
    async with reforward_net(tiny_model_dir) as net:
        a_wallet = net.wallet(chain, A_WALLET)
        run = await paid_reforward(net, chain, tmp_path, a_wallet)
        # The client paid A at A's price for B's token counts, and A paid B that from its own wallet.
        assert_client_paid_a(run)
        assert_a_paid_b(run, a_wallet)


async def test_a_re_forward_closed_mid_reply_finishes_its_payment_to_the_peer_at_once(
    chain: ChainEnv, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The client left after the first delta: the handler closes the re-forward's stream, and the node's payment
    to the peer is finished then (its reservation spent, the channel's admission free for the next request), not
    when the garbage collector gets to the inner generator."""
    async with reforward_net(tiny_model_dir) as net:
        a_wallet = net.wallet(chain, A_WALLET)
        a = await net.side(reforward=BOUND, account=dev_account(NODE_A), payer=a_wallet)
        b = await net.charging_side(chain, tmp_path / "b.sqlite", NODE_B)
        await a.make_busy()
        assert a.reforwarder is not None
        generation = GenerationRequest(
            request_id="left", prompt=PROMPT, params=SamplingParams(max_tokens=32, temperature=0.0)
        )
        stream = a.reforwarder.generate(request(a, max_tokens=32), generation, a.engine)
        async with contextlib.aclosing(stream), asyncio.timeout(REQUEST_TIMEOUT_S):
            first = await anext(stream)
            await stream.aclose()
        channel = a_wallet.channel(b.account.address)
        assert first.token_ids and channel is not None
        assert channel.in_flight == 0 and channel.owed == channel.last  # finished: the whole reservation spent
        assert dict(a.reforwarder.outcomes) == {"served_by_peer": 1}


async def test_without_a_wallet_a_node_never_re_forwards_to_a_charging_peer(
    chain: ChainEnv, tiny_model_dir: Path, tmp_path: Path
) -> None:
    async with reforward_net(tiny_model_dir) as net:
        a = await net.side(reforward=BOUND)
        b = await net.charging_side(chain, tmp_path / "b.sqlite", NODE_B)
        await _served_by_a_alone(net, a, b)


class _Midway(Exception):
    """A test failing halfway through."""


async def test_the_network_closes_everything_it_opened_when_a_test_fails_midway(
    chain: ChainEnv, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The harness itself: a failure after nodes, a busy engine, a used client and wallets were opened leaves none of
    them open, and nothing unclosed for the garbage collector to warn about in a later test."""
    gc.collect()  # what earlier tests left is theirs
    with pytest.raises(_Midway):
        async with reforward_net(tiny_model_dir) as net:
            a = await net.side(reforward=BOUND, payer=net.wallet(chain, A_WALLET))
            b = await net.charging_side(chain, tmp_path / "b.sqlite", NODE_B)
            wallet = net.wallet(chain, CLIENT)
            client = net.client(a)
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                await client.complete(request(a))  # its transport opened a session
                await a.make_busy()
            assert wallet.store.path.exists()
            raise _Midway
    assert not a.node.running and not b.node.running
    assert not await a.engine.check_health() and not await b.engine.check_health()
    assert not a.busy and all(relay.running is False for relay in net.relays.nodes())
    with pytest.raises(SessionClosed):
        await client.complete(request(a))
    assert not wallet.store.path.exists()  # a wallet without a state directory removes its book when closed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]


def test_the_forwarded_flag_is_serialised_only_when_set() -> None:
    model = "0x" + "ab" * 32
    plain = CompletionRequest(model=model, prompt="1+1=")
    assert b"forwarded" not in plain.to_bytes() and "forwarded" not in repr(plain)
    marked = plain.model_copy(update={"forwarded": True})
    assert b'"forwarded":true' in marked.to_bytes()
    assert CompletionRequest.from_bytes(marked.to_bytes()).forwarded
    assert CompletionRequest.from_bytes(plain.to_bytes()) == plain
