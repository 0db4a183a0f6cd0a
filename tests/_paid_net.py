"""A paying model node on a live overlay, for the payment tests: a real anvil with ``PaymentChannels``, a real torch
engine behind a ``PaymentGate`` and a SQLite voucher store, six relays on 127.0.0.1.

Why a module of its own: ``test_payments_overlay`` wrote it and the wallet and OpenAI-endpoint tests imported it from
there (a test module's private names). :func:`start_paid_net` releases what it opened when it fails midway, and
:meth:`PaidNet.close` stops the node (its engine closes with its app), closes its voucher book, then the relays.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ledger import VoucherStore, dev_account
from node.inference import EngineConfig, EngineStats, GenerationChunk, GenerationRequest, ScoreResult, TorchEngine
from node.overlay import CompletionRequest, Directory, ModelNode, OverlayConfig
from node.overlay._payments import PaymentGate
from node.overlay._serve import create_model_app
from node.testing import LocalNetwork, LocalNode, serve_ephemeral
from planetserve import ModelId
from tests.fixtures.chain import ChainEnv
from tests.fixtures.payments import payments

#: Anvil dev accounts: the model node's operator, a second model node's, the paying client's.
NODE, OTHER_NODE, CLIENT = 1, 2, 10
#: Wei per 1000 tokens: 1000 wei per token, with a remainder so the rounding up shows.
PRICE = 1_000_001
#: Prompts the payment tests send.
PROMPTS = ("the quick brown fox", "jumps over the lazy dog", "and runs far away", "hello there")


class CountingEngine:
    """The real torch engine, counting ``generate`` calls (what "the model never ran" is measured by)."""

    def __init__(self, inner: TorchEngine) -> None:
        self.inner = inner
        self.generated = 0

    @property
    def model_id(self) -> ModelId:
        return self.inner.model_id

    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        self.generated += 1
        return self.inner.generate(request)

    async def score(self, prompt: str | Sequence[int], completion: str | Sequence[int]) -> ScoreResult:
        return await self.inner.score(prompt, completion)

    def stats(self) -> EngineStats:
        return self.inner.stats()

    async def abort(self, request_id: str) -> bool:
        return await self.inner.abort(request_id)

    async def check_health(self) -> bool:
        return await self.inner.check_health()

    async def close(self) -> None:
        await self.inner.close()

    def tokenize(self, text: str) -> list[int]:
        return self.inner.tokenize(text)


@dataclass(slots=True)
class PaidNet:
    """A paying model node (``node``, dev account ``operator``) and the relays ``net`` it is reached through."""

    net: LocalNetwork
    node: LocalNode
    engine: CountingEngine
    store: VoucherStore
    operator: int = NODE

    def served(self) -> ModelNode:
        return ModelNode(
            operator=dev_account(self.operator).address,
            endpoint=self.node.endpoint,
            public_key=self.node.public_key,
            model_id=self.engine.model_id,
            price_per_1k_tokens=PRICE,
        )

    def directory(self) -> Directory:
        return Directory(relays=tuple(self.net.descriptors()), model_nodes=(self.served(),))

    async def stop(self) -> None:
        """Stop this model node (its engine closes with its app) and close its voucher book; the relays stay."""
        try:
            await self.node.stop()
        finally:
            self.store.close()

    async def close(self) -> None:
        """:meth:`stop`, then stop the relays (also when stopping the node failed)."""
        try:
            await self.stop()
        finally:
            await self.net.close()


def voucher_store(chain: ChainEnv, db: Path, node: int = NODE, kind: type[VoucherStore] = VoucherStore) -> VoucherStore:
    """Dev account ``node``'s voucher book in the SQLite file ``db``, on the chain's ``PaymentChannels``."""
    pay = payments(chain)
    return kind(f"sqlite:///{db}", domain=pay.domain(), node=dev_account(node).address, channels=pay)


async def start_paid_net(
    chain: ChainEnv,
    model_dir: Path,
    db: Path,
    net: LocalNetwork | None = None,
    node_index: int = NODE,
    kind: type[VoucherStore] = VoucherStore,
) -> PaidNet:
    """A model node of dev account ``node_index`` charging :data:`PRICE`, its book in ``db``, on ``net`` (six new
    relays when None: closed with the node by :meth:`PaidNet.close`). Whatever it opened is released if it fails."""
    own_net = net is None
    if net is None:

        async def nothing(_body: bytes) -> AsyncGenerator[bytes, None]:
            yield b""

        net = LocalNetwork(relays=6, handler=nothing)
        await net.__aenter__()
    engine: CountingEngine | None = None
    store: VoucherStore | None = None
    try:
        engine = CountingEngine(TorchEngine.from_folder(model_dir, EngineConfig(device="cpu", max_running=4)))
        store = voucher_store(chain, db, node_index, kind)
        gate = PaymentGate(store, price_per_1k_tokens=PRICE, tokenize=engine.tokenize)
        config = OverlayConfig(x25519_secret=secrets.token_bytes(32), role="model")
        app = create_model_app(config, engine, peers=net.peers, payments=gate)
        runner, endpoint = await serve_ephemeral(app)
    except BaseException:
        if engine is not None:
            await engine.close()
        if store is not None:
            store.close()
        if own_net:
            await net.close()
        raise
    node = LocalNode(
        name="model",
        config=config,
        app=app,
        runner=runner,
        endpoint=endpoint,
        node_id=bytes.fromhex(dev_account(node_index).address[2:]),
    )
    net.peers.add(node.peer())
    return PaidNet(net=net, node=node, engine=engine, store=store, operator=node_index)


def paid_request(paid: PaidNet, prompt: str, max_tokens: int = 4) -> CompletionRequest:
    """A greedy completion request for ``paid``'s model."""
    return CompletionRequest(model=paid.engine.model_id, prompt=prompt, max_tokens=max_tokens, temperature=0.0)
