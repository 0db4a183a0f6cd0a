"""The live re-forwarding network (protocol §10.5) that the re-forwarding tests share, in this process.

Model nodes with real torch engines and signed heartbeats, six relays, all real aiohttp servers on 127.0.0.1; a
client built here knows only the node it is given, so whatever another node serves reached it through that node,
on the client's own onion paths. ``tests/test_overlay_reforward.py`` proves the re-forwarding rules on it and
``tests/test_node_reforward_cli.py`` the wallet ``ps-node serve`` builds; both once imported private helpers from
one another's module.

Why one owner for every resource: a test that failed midway used to leave what came after its failure open (the
client's wallet, a node's engine when its start failed, the other sides when one side's stop raised), and pytest
runs with warnings as errors, so an unclosed session collected later failed whichever test was running then.
:func:`reforward_net` registers each thing it opens (relays, engines, nodes, re-forwarders, clients, wallets) on
one :class:`contextlib.AsyncExitStack` as it opens it, and closes them in reverse order however the test ends; one
close failing does not skip the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from eth_account import Account
from eth_account.signers.local import LocalAccount

from ledger import VoucherStore, dev_account
from node.client import Client, ClientConfig, Completion
from node.client._wallet import Wallet, cost
from node.inference import EngineConfig, EngineStats, GenerationRequest, SamplingParams, TorchEngine
from node.overlay import CompletionRequest, Directory, ModelNode, OverlayConfig
from node.overlay._heartbeat import HeartbeatPublisher
from node.overlay._payments import PaymentGate
from node.overlay._reforward import Payer, ReforwardConfig, Reforwarder
from node.overlay._serve import create_model_app
from node.testing import LocalNetwork, LocalNode, serve_ephemeral
from tests.fixtures.chain import ChainEnv
from tests.fixtures.payments import payments

PROMPT = "03+04=07\n12+05="
#: Dev accounts: model nodes A and B, A's own wallet, the client's wallet; wei per 1000 tokens of both nodes.
NODE_A, NODE_B, A_WALLET, CLIENT = 1, 2, 11, 10
PRICE = 1_000_001
#: A prompt the busy loops generate from (long enough that the one engine slot stays taken).
BUSY_PROMPT = "the quick brown fox jumps over the lazy dog; " * 3
#: Most seconds one test's requests may take (a loaded 2-core machine; they take well under one each when idle).
REQUEST_TIMEOUT_S = 60
#: Re-forward as soon as one request waits (the operator is replaced by each side's own).
BOUND = ReforwardConfig(operator="0x" + "00" * 20, queue_bound=0)
#: Seconds :meth:`Side.make_busy` and :meth:`Side.idle` wait for the engine.
_ENGINE_WAIT_S = 30


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
    """One model node of the network: its operator, engine, server, re-forwarder and (charging) payment gate."""

    account: LocalAccount
    engine: TorchEngine
    node: LocalNode
    served: Served
    reforwarder: Reforwarder | None
    gate: PaymentGate | None = None
    busy: list[asyncio.Task[None]] = field(default_factory=list)
    stopping: bool = False

    @property
    def price(self) -> int:
        """Wei per 1000 tokens (0: serves for free)."""
        return int(self.gate.price_per_1k_tokens) if self.gate is not None else 0

    @property
    def store(self) -> VoucherStore:
        """The charging node's voucher book (what clients owe it)."""
        assert self.gate is not None, "a free node keeps no book"
        return self.gate.store

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
                async with contextlib.aclosing(self.engine.generate(request)) as chunks:
                    async for _ in chunks:
                        pass

        self.busy = [asyncio.create_task(loop(i)) for i in range(loops)]
        async with asyncio.timeout(_ENGINE_WAIT_S):
            while self.engine.stats().queued_requests < 1:
                await asyncio.sleep(0.01)

    async def idle(self) -> None:
        # The flag as well as the cancel: Python 3.11's wait_for (inside the engine's stream) can swallow a
        # cancellation that races with a chunk arriving, and a loop would then run on for ever.
        self.stopping = True
        for task in self.busy:
            task.cancel()
        async with asyncio.timeout(_ENGINE_WAIT_S):
            await asyncio.gather(*self.busy, return_exceptions=True)
        self.busy = []


def zero_load(stats: Callable[[], EngineStats]) -> Callable[[], EngineStats]:
    """A heartbeat that says the node is idle whatever its engine says (a node under-reporting its load)."""
    return lambda: dataclasses.replace(
        stats(), queued_requests=0, running_requests=0, queued_tokens=0, decode_backlog_tokens=0
    )


def charging_gate(chain: ChainEnv, db: Path, node: int) -> Callable[[TorchEngine], PaymentGate]:
    """A payment gate for dev account ``node`` at :data:`PRICE`, its voucher book in the SQLite file ``db``."""

    def make(engine: TorchEngine) -> PaymentGate:
        pay = payments(chain)
        store = VoucherStore(f"sqlite:///{db}", domain=pay.domain(), node=dev_account(node).address, channels=pay)
        return PaymentGate(store, price_per_1k_tokens=PRICE, tokenize=engine.tokenize)

    return make


@dataclass(slots=True)
class ReforwardNet:
    """Six relays and the model nodes :meth:`side` adds; everything opened through it is closed with it."""

    model_dir: Path
    relays: LocalNetwork
    stack: contextlib.AsyncExitStack
    sides: list[Side] = field(default_factory=list)

    def directory(self, *only: Side) -> Directory:
        nodes = tuple(s.model_node() for s in (only or self.sides))
        return Directory(relays=tuple(self.relays.descriptors()), model_nodes=nodes)

    async def side(
        self,
        *,
        reforward: ReforwardConfig | None,
        lie: bool = False,
        refresh_s: float = 0.0,
        account: LocalAccount | None = None,
        gate: Callable[[TorchEngine], PaymentGate] | None = None,
        payer: Payer | None = None,
        forger: LocalAccount | None = None,
    ) -> Side:
        """Start a model node (one request at a time, up to 32 waiting). ``reforward``: its re-forwarding (None:
        none); ``lie``: its heartbeat says idle whatever its load; ``forger``: its heartbeats are signed by that key,
        not its operator's; ``gate``: it charges; ``payer``: how it pays charging peers."""
        account = account or Account.create()
        engine = TorchEngine.from_folder(self.model_dir, EngineConfig(device="cpu", max_running=1, max_queue=32))
        self.stack.push_async_callback(engine.close)  # the node's app closes it too; this covers a failed start
        publisher = HeartbeatPublisher(
            account=forger or account,
            model_id=engine.model_id,
            stats=zero_load(engine.stats) if lie else engine.stats,
            interval_s=0.05,
        )
        publisher.operator = account.address  # with a forger: heartbeats naming this node, signed by someone else

        async def registry_view() -> Directory:
            return self.directory()

        reforwarder = None
        if reforward is not None:
            settings = dataclasses.replace(reforward, operator=account.address, heartbeat_refresh_s=refresh_s)
            reforwarder = Reforwarder(settings, registry_view, payer=payer, tokenize=engine.tokenize)
            self.stack.push_async_callback(reforwarder.close)
        served = Served()
        config = OverlayConfig(x25519_secret=secrets.token_bytes(32), role="model")
        payments_gate = gate(engine) if gate is not None else None
        if payments_gate is not None:
            self.stack.callback(payments_gate.store.close)  # after the node stops (pushed before it)
        app = create_model_app(
            config,
            engine,
            peers=self.relays.peers,
            heartbeat=publisher,
            observers=[served],
            reforward=reforwarder,
            payments=payments_gate,
        )
        runner, endpoint = await serve_ephemeral(app)
        node_id = bytes.fromhex(account.address[2:])
        node = LocalNode(name="model", config=config, app=app, runner=runner, endpoint=endpoint, node_id=node_id)
        self.stack.push_async_callback(node.stop)
        self.relays.peers.add(node.peer())
        side = Side(account=account, engine=engine, node=node, served=served, reforwarder=reforwarder)
        side.gate = payments_gate
        self.stack.push_async_callback(side.idle)  # first of this side's closes: its busy loops use the engine
        self.sides.append(side)
        return side

    async def charging_side(
        self,
        chain: ChainEnv,
        db: Path,
        node: int,
        *,
        reforward: ReforwardConfig | None = None,
        payer: Payer | None = None,
    ) -> Side:
        """A model node of dev account ``node`` that charges :data:`PRICE`, its voucher book in ``db``."""
        gate = charging_gate(chain, db, node)
        return await self.side(reforward=reforward, account=dev_account(node), gate=gate, payer=payer)

    def client(self, only: Side, wallet: Wallet | None = None) -> Client:
        """A client that knows only ``only`` among the model nodes: it can reach no other one itself."""
        config = ClientConfig(heartbeat_refresh_s=0.0)
        client = Client(self.directory(only), config, tokenizer=only.engine.tokenize, wallet=wallet)
        self.stack.push_async_callback(client.close)
        return client

    def wallet(self, chain: ChainEnv, account: int) -> Wallet:
        """A wallet of dev account ``account`` (budget 10^15 wei, channels of 10^14), closed with the network."""
        wallet = Wallet(payments(chain), dev_account(account), budget_wei=10**15, deposit_wei=10**14)
        self.stack.callback(wallet.close)
        return wallet


@contextlib.asynccontextmanager
async def reforward_net(model_dir: Path) -> AsyncIterator[ReforwardNet]:
    """Six relays on 127.0.0.1 and the model nodes a test adds with :meth:`ReforwardNet.side`, all served from
    ``model_dir``; on exit (a failure included) everything opened through the network is closed."""

    async def nothing(_body: bytes) -> AsyncIterator[bytes]:
        yield b""

    async with contextlib.AsyncExitStack() as stack:
        relays = await stack.enter_async_context(LocalNetwork(relays=6, handler=nothing))
        yield ReforwardNet(model_dir=model_dir, relays=relays, stack=stack)


def request(side: Side, *, forwarded: bool = False, max_tokens: int = 8) -> CompletionRequest:
    """:data:`PROMPT` to ``side``'s model, greedy."""
    return CompletionRequest(
        model=side.engine.model_id, prompt=PROMPT, max_tokens=max_tokens, temperature=0.0, forwarded=forwarded
    )


async def greedy(engine: TorchEngine, max_tokens: int = 8) -> tuple[int, ...]:
    """The engine's own greedy answer to :data:`PROMPT` (what a relayed reply must equal)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    tokens: list[int] = []
    generation = GenerationRequest(request_id="reference", prompt=PROMPT, params=params)
    async with contextlib.aclosing(engine.generate(generation)) as chunks:
        async for chunk in chunks:
            tokens.extend(chunk.token_ids)
    return tuple(tokens)


async def metrics_text(side: Side) -> str:
    """The node's Prometheus exposition at ``/metrics``."""
    async with aiohttp.ClientSession() as session, session.get(side.node.endpoint + "/metrics") as response:
        return await response.text()


@dataclass(frozen=True, slots=True, kw_only=True)
class PaidReforward:
    """One paid request the client sent to A and A re-forwarded to the charging B (see :func:`paid_reforward`)."""

    a: Side
    b: Side
    client_wallet: Wallet
    result: Completion

    @property
    def owed(self) -> int:
        """What the request costs at :data:`PRICE` on B's token counts, in wei."""
        return cost(PRICE, self.result.prompt_tokens + self.result.completion_tokens)


async def paid_reforward(net: ReforwardNet, chain: ChainEnv, tmp_path: Path, a_wallet: Wallet) -> PaidReforward:
    """A (dev account :data:`NODE_A`, charging, paying its peers from ``a_wallet``) kept busy, B (:data:`NODE_B`,
    charging) idle; the client (:data:`CLIENT`'s wallet) knows only A. Asserts that A served the request through B."""
    a = await net.charging_side(chain, tmp_path / "a.sqlite", NODE_A, reforward=BOUND, payer=a_wallet)
    b = await net.charging_side(chain, tmp_path / "b.sqlite", NODE_B)
    await a.make_busy()
    client_wallet = net.wallet(chain, CLIENT)
    async with net.client(a, client_wallet) as client, asyncio.timeout(REQUEST_TIMEOUT_S):
        result = await client.complete(request(a))
    assert a.reforwarder is not None and dict(a.reforwarder.outcomes) == {"served_by_peer": 1}
    assert b.served.count == 1
    return PaidReforward(a=a, b=b, client_wallet=client_wallet, result=result)


def assert_client_paid_a(run: PaidReforward) -> None:
    """The client paid A (its voucher was for A's channel) at A's price for B's token counts; A's book says so."""
    client_channel = run.client_wallet.channel(run.a.account.address)
    assert client_channel is not None and client_channel.owed == run.owed
    a_book = run.a.store.book(client_channel.channel_id)
    assert a_book is not None and a_book.owed == run.owed and a_book.reserved == 0


def assert_a_paid_b(run: PaidReforward, a_wallet: Wallet, b_store: VoucherStore | None = None) -> None:
    """A paid B from ``a_wallet``, on A's own channel, exactly what B charged; B's book (``b_store``, default the
    running B's; the network closes it) agrees, and B never saw the client's channel."""
    store = b_store if b_store is not None else run.b.store
    a_channel = a_wallet.channel(run.b.account.address)
    assert a_channel is not None and a_channel.owed == run.owed
    b_book = store.book(a_channel.channel_id)
    assert b_book is not None and b_book.owed == run.owed
    assert [book.channel_id for book in store.books()] == [a_channel.channel_id]
