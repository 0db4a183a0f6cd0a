"""Re-forwarding by an overloaded model node (protocol §10.5), live: two model nodes with real torch engines and
signed heartbeats, six relays, all real aiohttp servers on 127.0.0.1; the client sends over 4 onion paths of 3 relays
and knows only node A, so whatever B serves reached the client through A, on the client's own paths.

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
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from eth_account import Account
from eth_account.signers.local import LocalAccount

from ledger import Indexer, VoucherStore, dev_account
from node.client import Client, ClientConfig
from node.client._wallet import Wallet, cost
from node.inference import EngineConfig, EngineStats, GenerationRequest, SamplingParams, TorchEngine
from node.overlay import CompletionError, CompletionRequest, Directory, ModelNode, OverlayConfig
from node.overlay._heartbeat import HEARTBEAT_PATH, Heartbeat, HeartbeatPublisher, sign_heartbeat
from node.overlay._payments import PaymentGate
from node.overlay._reforward import Payer, ReforwardConfig, Reforwarder
from node.overlay._serve import create_model_app, registry_directory_source
from node.testing import LocalNetwork, LocalNode, serve_ephemeral
from planetserve import ModelId
from tests.fixtures.chain import ChainEnv
from tests.fixtures.payments import payments

PROMPT = "03+04=07\n12+05="
#: Dev accounts: model nodes A and B, A's own wallet, the client's wallet; wei per 1000 tokens of both nodes.
NODE_A, NODE_B, A_WALLET, CLIENT = 1, 2, 11, 10
PRICE = 1_000_001
LONG = 400
LONG_PROMPTS = ("the quick brown fox", "hello there, ", "and runs far away ", "a b c d e f ")
BUSY_PROMPT = "the quick brown fox jumps over the lazy dog; " * 3


class Served:
    """A request observer counting the requests a node's handler finished (its engine's or relayed ones)."""

    def __init__(self) -> None:
        self.count = 0

    def started(self, prompt: str) -> None:
        return None

    def first_token(self, seconds: float) -> None:
        return None

    def finished(
        self, *, prompt_tokens: int, completion_tokens: int, cached_tokens: int, finish_reason: str, seconds: float
    ) -> None:
        self.count += 1


@dataclass(slots=True)
class Side:
    account: LocalAccount
    engine: TorchEngine
    node: LocalNode
    served: Served
    reforwarder: Reforwarder | None
    price: int = 0
    busy: list[asyncio.Task[None]] = field(default_factory=list)
    stopping: bool = False

    def model_node(self) -> ModelNode:
        return ModelNode(
            operator=self.account.address,
            endpoint=self.node.endpoint,
            public_key=self.node.public_key,
            model_id=self.engine.model_id,
            price_per_1k_tokens=self.price,
        )

    async def make_busy(self, loops: int = 3) -> None:
        """Keep the engine's one slot taken and requests waiting for it until :meth:`idle` (real generations)."""
        params = SamplingParams(max_tokens=48, temperature=0.0)

        self.stopping = False

        async def loop(i: int) -> None:
            n = 0
            while not self.stopping:
                n += 1
                request = GenerationRequest(request_id=f"busy-{i}-{n}", prompt=BUSY_PROMPT + str(i), params=params)
                async for _ in self.engine.generate(request):
                    pass

        self.busy = [asyncio.create_task(loop(i)) for i in range(loops)]
        async with asyncio.timeout(30):
            while self.engine.stats().queued_requests < 1:
                await asyncio.sleep(0.01)

    async def idle(self) -> None:
        # The flag as well as the cancel: Python 3.11's wait_for (inside the engine's stream) can swallow a
        # cancellation that races with a chunk arriving, and a loop would then run on for ever.
        self.stopping = True
        for task in self.busy:
            task.cancel()
        async with asyncio.timeout(30):
            await asyncio.gather(*self.busy, return_exceptions=True)
        self.busy = []


@dataclass(slots=True)
class Net:
    relays: LocalNetwork
    sides: list[Side] = field(default_factory=list)

    def directory(self, *only: Side) -> Directory:
        nodes = tuple(s.model_node() for s in (only or self.sides))
        return Directory(relays=tuple(self.relays.descriptors()), model_nodes=nodes)


def _zero_load(stats: Callable[[], EngineStats]) -> Callable[[], EngineStats]:
    """A heartbeat that says the node is idle whatever its engine says (a node under-reporting its load)."""
    return lambda: dataclasses.replace(
        stats(), queued_requests=0, running_requests=0, queued_tokens=0, decode_backlog_tokens=0
    )


async def _side(
    net: Net,
    model_dir: Path,
    *,
    reforward: ReforwardConfig | None,
    lie: bool = False,
    refresh_s: float = 0.0,
    account: LocalAccount | None = None,
    gate: Callable[[TorchEngine], PaymentGate] | None = None,
    payer: Payer | None = None,
    forger: LocalAccount | None = None,
) -> Side:
    account = account or Account.create()
    engine = TorchEngine.from_folder(model_dir, EngineConfig(device="cpu", max_running=1, max_queue=32))
    publisher = HeartbeatPublisher(
        account=forger or account,
        model_id=engine.model_id,
        stats=_zero_load(engine.stats) if lie else engine.stats,
        interval_s=0.05,
    )
    publisher.operator = account.address  # with a forger: heartbeats naming this node, signed by someone else

    async def registry_view() -> Directory:
        return net.directory()

    reforwarder = None
    if reforward is not None:
        settings = dataclasses.replace(reforward, operator=account.address, heartbeat_refresh_s=refresh_s)
        reforwarder = Reforwarder(settings, registry_view, payer=payer, tokenize=engine.tokenize)
    served = Served()
    config = OverlayConfig(x25519_secret=secrets.token_bytes(32), role="model")
    payments = gate(engine) if gate is not None else None
    app = create_model_app(
        config,
        engine,
        peers=net.relays.peers,
        heartbeat=publisher,
        observers=[served],
        reforward=reforwarder,
        payments=payments,
    )
    runner, endpoint = await serve_ephemeral(app)
    node_id = bytes.fromhex(account.address[2:])
    node = LocalNode(name="model", config=config, app=app, runner=runner, endpoint=endpoint, node_id=node_id)
    net.relays.peers.add(node.peer())
    price = int(payments.price_per_1k_tokens) if payments is not None else 0
    side = Side(account=account, engine=engine, node=node, served=served, reforwarder=reforwarder, price=price)
    net.sides.append(side)
    return side


@contextlib.asynccontextmanager
async def _net() -> AsyncIterator[Net]:
    async def nothing(_body: bytes) -> AsyncIterator[bytes]:
        yield b""

    relays = LocalNetwork(relays=6, handler=nothing)
    await relays.__aenter__()
    net = Net(relays=relays)
    try:
        yield net
    finally:
        for side in net.sides:
            await side.idle()
            await side.node.stop()
        await relays.close()


#: Most seconds one test's requests may take (a loaded 2-core machine; they take well under one each when idle).
REQUEST_TIMEOUT_S = 60


def _client(net: Net, only: Side, wallet: Wallet | None = None) -> Client:
    """A client that knows only ``only`` among the model nodes: it can reach no other one itself."""
    config = ClientConfig(heartbeat_refresh_s=0.0)
    return Client(net.directory(only), config, tokenizer=only.engine.tokenize, wallet=wallet)


def _request(side: Side, *, forwarded: bool = False, max_tokens: int = 8) -> CompletionRequest:
    return CompletionRequest(
        model=side.engine.model_id, prompt=PROMPT, max_tokens=max_tokens, temperature=0.0, forwarded=forwarded
    )


async def _greedy(engine: TorchEngine, max_tokens: int = 8) -> tuple[int, ...]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    tokens: list[int] = []
    async for chunk in engine.generate(GenerationRequest(request_id="reference", prompt=PROMPT, params=params)):
        tokens.extend(chunk.token_ids)
    return tuple(tokens)


async def _metrics_text(side: Side) -> str:
    async with aiohttp.ClientSession() as session, session.get(side.node.endpoint + "/metrics") as response:
        return await response.text()


BOUND = ReforwardConfig(operator="0x" + "00" * 20, queue_bound=0)


async def test_an_overloaded_node_re_forwards_to_an_idle_peer_and_the_client_gets_its_whole_answer(
    tiny_model_dir: Path,
) -> None:
    async with _net() as net:
        a = await _side(net, tiny_model_dir, reforward=BOUND)
        b = await _side(net, tiny_model_dir, reforward=BOUND)
        await a.make_busy()
        async with _client(net, a) as client, asyncio.timeout(REQUEST_TIMEOUT_S):
            result = await client.complete(_request(a))
        assert a.reforwarder is not None and b.reforwarder is not None
        assert dict(a.reforwarder.outcomes) == {"served_by_peer": 1}
        assert b.served.count == 1 and a.served.count == 1  # B generated it; A relayed it (and counted it as served)
        assert not b.reforwarder.outcomes  # B was under its bound: it just served
        await a.idle()
        assert result.token_ids == await _greedy(b.engine)
        assert result.finish_reason in {"stop", "length"}
        assert 'planetserve_reforwards_total{outcome="served_by_peer"} 1.0' in await _metrics_text(a)


async def test_a_re_forwarded_request_is_never_re_forwarded_again(tiny_model_dir: Path) -> None:
    async with _net() as net:
        # Both over their bound, both claiming to be idle: each looks like the perfect peer to the other.
        a = await _side(net, tiny_model_dir, reforward=BOUND, lie=True)
        b = await _side(net, tiny_model_dir, reforward=BOUND, lie=True)
        await a.make_busy()
        await b.make_busy()
        async with _client(net, a) as client, asyncio.timeout(REQUEST_TIMEOUT_S):
            result = await client.complete(_request(a))
        assert a.reforwarder is not None and b.reforwarder is not None
        assert dict(a.reforwarder.outcomes) == {"served_by_peer": 1}
        assert dict(b.reforwarder.outcomes) == {"already_forwarded": 1}  # B served it itself, queued behind its load
        assert b.served.count == 1
        assert result.finish_reason in {"stop", "length"}


async def test_a_client_marking_its_request_forwarded_only_loses_the_option(tiny_model_dir: Path) -> None:
    async with _net() as net:
        a = await _side(net, tiny_model_dir, reforward=BOUND)
        b = await _side(net, tiny_model_dir, reforward=BOUND)
        await a.make_busy()
        async with _client(net, a) as client, asyncio.timeout(REQUEST_TIMEOUT_S):
            result = await client.complete(_request(a, forwarded=True))
        assert a.reforwarder is not None
        assert dict(a.reforwarder.outcomes) == {"already_forwarded": 1}
        assert b.served.count == 0 and a.served.count == 1
        await a.idle()
        assert result.token_ids == await _greedy(a.engine)


async def test_a_peer_that_fails_before_answering_leaves_the_request_to_the_node(tiny_model_dir: Path) -> None:
    async with _net() as net:
        # A keeps B's last heartbeat for a minute: B will look idle (and alive) after it died.
        trusting = dataclasses.replace(BOUND, heartbeat_max_age_s=60.0)
        a = await _side(net, tiny_model_dir, reforward=trusting, refresh_s=60.0)
        b = await _side(net, tiny_model_dir, reforward=BOUND)
        await a.make_busy()
        async with _client(net, a) as client, asyncio.timeout(REQUEST_TIMEOUT_S):
            await client.complete(_request(a))
            assert a.reforwarder is not None and a.reforwarder.outcomes["served_by_peer"] == 1
            await b.node.stop()
            result = await client.complete(_request(a))
        assert a.reforwarder.outcomes["peer_failed"] == 1
        assert a.served.count == 2 and b.served.count == 1
        await a.idle()
        assert result.token_ids == await _greedy(a.engine)


async def test_a_peer_dying_mid_reply_ends_the_reply_with_reforward_failed(tiny_model_dir: Path) -> None:
    async with _net() as net:
        a = await _side(net, tiny_model_dir, reforward=BOUND)
        b = await _side(net, tiny_model_dir, reforward=None)
        # A prompt whose greedy answer runs long (a fresh tiny model may stop some early): long enough that B cannot
        # finish it within its stop's grace period, whatever the machine's speed.
        prompt, length = "", 0
        for candidate in LONG_PROMPTS:
            params = SamplingParams(max_tokens=LONG, temperature=0.0)
            request = GenerationRequest(request_id=f"probe-{len(candidate)}", prompt=candidate, params=params)
            tokens = [t async for chunk in b.engine.generate(request) for t in chunk.token_ids]
            if len(tokens) > length:
                prompt, length = candidate, len(tokens)
            if length == LONG:
                break
        assert length >= LONG // 2
        await a.make_busy()
        deltas = 0
        async with _client(net, a) as client, asyncio.timeout(REQUEST_TIMEOUT_S):
            long = CompletionRequest(model=a.engine.model_id, prompt=prompt, max_tokens=LONG, temperature=0.0)
            with pytest.raises(CompletionError) as failed:
                async for _delta in client.stream(long):
                    deltas += 1
                    if deltas == 1:
                        await b.node.stop()  # B crashes while A relays its reply
        assert failed.value.code == "reforward_failed"
        assert a.reforwarder is not None and dict(a.reforwarder.outcomes) == {"broken": 1}


async def test_re_forwards_in_flight_are_bounded(tiny_model_dir: Path) -> None:
    async with _net() as net:
        one = dataclasses.replace(BOUND, max_concurrent=1)
        a = await _side(net, tiny_model_dir, reforward=one)
        # B looks idle but answers slowly (its own queue): a re-forward holds A's one slot for a second or more, so
        # the client's three requests, sent at once, find it taken.
        b = await _side(net, tiny_model_dir, reforward=one, lie=True)
        await a.make_busy()
        await b.make_busy()
        async with _client(net, a) as client, asyncio.timeout(REQUEST_TIMEOUT_S):
            results = await asyncio.gather(*(client.complete(_request(a, max_tokens=32)) for _ in range(3)))
        assert a.reforwarder is not None
        assert a.reforwarder.peak_in_flight == 1
        assert a.reforwarder.outcomes["served_by_peer"] >= 1 and a.reforwarder.outcomes["busy"] >= 1
        assert sum(a.reforwarder.outcomes.values()) == 3
        assert b.served.count == a.reforwarder.outcomes["served_by_peer"]
        assert all(r.finish_reason in {"stop", "length"} for r in results)


async def test_a_peer_whose_heartbeat_is_forged_is_never_re_forwarded_to(tiny_model_dir: Path) -> None:
    async with _net() as net:
        a = await _side(net, tiny_model_dir, reforward=BOUND)
        b = await _side(net, tiny_model_dir, reforward=None, forger=Account.create())
        await a.make_busy()
        async with _client(net, a) as client, asyncio.timeout(REQUEST_TIMEOUT_S):
            result = await client.complete(_request(a))
        assert a.reforwarder is not None and dict(a.reforwarder.outcomes) == {"no_peer": 1}
        assert b.served.count == 0 and a.served.count == 1
        assert result.finish_reason in {"stop", "length"}


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
    for _ in range(5):
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(source(), 0.05)
    view = await asyncio.wait_for(source(), 30)
    assert len(syncs) == 1 and isinstance(view, Directory)
    assert await source() is view  # within refresh_s: served from memory


def _gate(chain: ChainEnv, db: Path, node: int) -> Callable[[TorchEngine], PaymentGate]:
    def make(engine: TorchEngine) -> PaymentGate:
        pay = payments(chain)
        store = VoucherStore(f"sqlite:///{db}", domain=pay.domain(), node=dev_account(node).address, channels=pay)
        return PaymentGate(store, price_per_1k_tokens=PRICE, tokenize=engine.tokenize)

    return make


def _wallet(chain: ChainEnv, account: int) -> Wallet:
    return Wallet(payments(chain), dev_account(account), budget_wei=10**15, deposit_wei=10**14)


async def test_a_paid_request_is_re_forwarded_to_a_charging_peer_paid_from_the_nodes_own_wallet(
    chain: ChainEnv, tiny_model_dir: Path, tmp_path: Path
) -> None:
    async with _net() as net:
        a_wallet = _wallet(chain, A_WALLET)
        a = await _side(
            net,
            tiny_model_dir,
            reforward=BOUND,
            account=dev_account(NODE_A),
            gate=_gate(chain, tmp_path / "a.sqlite", NODE_A),
            payer=a_wallet,
        )
        b = await _side(
            net,
            tiny_model_dir,
            reforward=None,
            account=dev_account(NODE_B),
            gate=_gate(chain, tmp_path / "b.sqlite", NODE_B),
        )
        await a.make_busy()
        client_wallet = _wallet(chain, CLIENT)
        async with _client(net, a, client_wallet) as client, asyncio.timeout(REQUEST_TIMEOUT_S):
            result = await client.complete(_request(a))
        assert a.reforwarder is not None and dict(a.reforwarder.outcomes) == {"served_by_peer": 1}
        assert b.served.count == 1
        # The client paid A (its voucher was for A's channel) at A's price, for B's token counts...
        used = result.prompt_tokens + result.completion_tokens
        client_channel = client_wallet.channel(a.account.address)
        assert client_channel is not None and client_channel.owed == cost(PRICE, used)
        a_store = _gate(chain, tmp_path / "a.sqlite", NODE_A)(a.engine).store
        a_book = a_store.book(client_channel.channel_id)
        assert a_book is not None and a_book.owed == cost(PRICE, used) and a_book.reserved == 0
        # ... and A paid B from its own wallet, on its own channel, exactly what B charged.
        a_channel = a_wallet.channel(b.account.address)
        assert a_channel is not None and a_channel.owed == cost(PRICE, used)
        b_store = _gate(chain, tmp_path / "b.sqlite", NODE_B)(b.engine).store
        b_book = b_store.book(a_channel.channel_id)
        assert b_book is not None and b_book.owed == cost(PRICE, used)
        assert [book.channel_id for book in b_store.books()] == [a_channel.channel_id]  # B never saw the client's


async def test_a_re_forward_closed_mid_reply_finishes_its_payment_to_the_peer_at_once(
    chain: ChainEnv, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The client left after the first delta: the handler closes the re-forward's stream, and the node's payment
    to the peer is finished then (its reservation spent, the channel's admission free for the next request), not
    when the garbage collector gets to the inner generator."""
    async with _net() as net:
        a_wallet = _wallet(chain, A_WALLET)
        a = await _side(net, tiny_model_dir, reforward=BOUND, account=dev_account(NODE_A), payer=a_wallet)
        b = await _side(
            net,
            tiny_model_dir,
            reforward=None,
            account=dev_account(NODE_B),
            gate=_gate(chain, tmp_path / "b.sqlite", NODE_B),
        )
        await a.make_busy()
        assert a.reforwarder is not None
        generation = GenerationRequest(
            request_id="left", prompt=PROMPT, params=SamplingParams(max_tokens=32, temperature=0.0)
        )
        stream = a.reforwarder.generate(_request(a, max_tokens=32), generation, a.engine)
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            first = await anext(stream)
            await stream.aclose()
        channel = a_wallet.channel(b.account.address)
        assert first.token_ids and channel is not None
        assert channel.in_flight == 0 and channel.owed == channel.last  # finished: the whole reservation spent
        assert dict(a.reforwarder.outcomes) == {"served_by_peer": 1}


async def test_without_a_wallet_a_node_never_re_forwards_to_a_charging_peer(
    chain: ChainEnv, tiny_model_dir: Path, tmp_path: Path
) -> None:
    async with _net() as net:
        a = await _side(net, tiny_model_dir, reforward=BOUND)
        b = await _side(
            net,
            tiny_model_dir,
            reforward=None,
            account=dev_account(NODE_B),
            gate=_gate(chain, tmp_path / "b.sqlite", NODE_B),
        )
        await a.make_busy()
        async with _client(net, a) as client, asyncio.timeout(REQUEST_TIMEOUT_S):
            result = await client.complete(_request(a))
        assert a.reforwarder is not None and dict(a.reforwarder.outcomes) == {"no_peer": 1}
        assert b.served.count == 0 and a.served.count == 1
        assert result.finish_reason in {"stop", "length"}


def test_the_forwarded_flag_is_serialised_only_when_set() -> None:
    model = "0x" + "ab" * 32
    plain = CompletionRequest(model=model, prompt="1+1=")
    assert b"forwarded" not in plain.to_bytes() and "forwarded" not in repr(plain)
    marked = plain.model_copy(update={"forwarded": True})
    assert b'"forwarded":true' in marked.to_bytes()
    assert CompletionRequest.from_bytes(marked.to_bytes()).forwarded
    assert CompletionRequest.from_bytes(plain.to_bytes()) == plain
