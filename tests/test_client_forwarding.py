"""Forwarding through the ``Client``, live: two model nodes with real torch engines publishing signed heartbeats,
six relays, every request over 4 onion paths of 3 relays on 127.0.0.1.

What is proven: prompts sharing a prefix go to the node that holds it (by the client's own memory, and for a fresh
client by the node's salted cache summary); a loaded node is avoided; a node whose heartbeats are forged or stale is
treated as silent and not routed to while another answers.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from node.client import Client, ClientConfig
from node.inference import EngineConfig, GenerationRequest, SamplingParams, TorchEngine
from node.inference._prefix import chunk_hashes
from node.overlay import CompletionRequest, Directory, ModelNode, OverlayConfig
from node.overlay._heartbeat import CacheSummaryBuilder, HeartbeatPublisher
from node.overlay._serve import create_model_app
from node.testing import LocalNetwork, LocalNode, serve_ephemeral

#: A shared document longer than several 16-token chunks (the tiny model's tokenizer makes ~1 token per 2-3 chars).
DOCUMENT = "the quick brown fox jumps over the lazy dog and runs far away; " * 8


@dataclass(slots=True)
class ModelSide:
    account: LocalAccount
    engine: TorchEngine
    publisher: HeartbeatPublisher
    node: LocalNode


@dataclass(slots=True)
class Network:
    net: LocalNetwork
    models: list[ModelSide] = field(default_factory=list)

    def directory(self) -> Directory:
        nodes = tuple(
            ModelNode(
                operator=m.account.address,
                endpoint=m.node.endpoint,
                public_key=m.node.public_key,
                model_id=m.engine.model_id,
                price_per_1k_tokens=0,
            )
            for m in self.models
        )
        return Directory(relays=tuple(self.net.descriptors()), model_nodes=nodes)

    def by_operator(self, operator: str) -> ModelSide:
        return next(m for m in self.models if m.account.address == operator)


async def _model_side(
    net: LocalNetwork, model_dir: Path, *, signer: LocalAccount | None = None, interval_s: float = 0.05
) -> ModelSide:
    account = Account.create()
    engine = TorchEngine.from_folder(model_dir, EngineConfig(device="cpu", max_running=4, max_queue=32))
    publisher = HeartbeatPublisher(
        account=signer or account,
        model_id=engine.model_id,
        stats=engine.stats,
        prefix_hashes=lambda prompt: chunk_hashes(engine.tokenize(prompt)),
        builder=CacheSummaryBuilder(k_distinct=3),
        interval_s=interval_s,
    )
    if signer is not None:
        # A node whose heartbeats claim another operator cannot sign for its own: the publisher signs as ``signer``
        # but names this node's operator.
        publisher.operator = account.address
    config = OverlayConfig(x25519_secret=secrets.token_bytes(32), role="model")
    app = create_model_app(config, engine, peers=net.peers, heartbeat=publisher)
    runner, endpoint = await serve_ephemeral(app)
    node = LocalNode(
        name="model",
        config=config,
        app=app,
        runner=runner,
        endpoint=endpoint,
        node_id=bytes.fromhex(account.address[2:]),
    )
    net.peers.add(node.peer())
    return ModelSide(account=account, engine=engine, publisher=publisher, node=node)


async def _network(model_dir: Path, **kinds: dict[str, object]) -> Network:
    async def nothing(_body: bytes) -> AsyncIterator[bytes]:
        yield b""

    net = LocalNetwork(relays=6, handler=nothing)
    await net.__aenter__()
    network = Network(net=net)
    for name in ("a", "b"):
        network.models.append(await _model_side(net, model_dir, **kinds.get(name, {})))  # type: ignore[arg-type]
    return network


async def _close(network: Network) -> None:
    for m in network.models:
        await m.node.stop()
    await network.net.close()


def _request(engine: TorchEngine, prompt: str, max_tokens: int = 2) -> CompletionRequest:
    return CompletionRequest(model=engine.model_id, prompt=prompt, max_tokens=max_tokens, temperature=0.0)


def _client(network: Network, tokenizer: TorchEngine, routes: list[str]) -> Client:
    return Client(
        network.directory(),
        ClientConfig(heartbeat_refresh_s=0.0),
        tokenizer=tokenizer.tokenize,
        on_route=lambda route: routes.append(route.destination.operator),
    )


async def test_prompts_sharing_a_prefix_follow_it_by_memory_and_a_fresh_client_by_the_cache_summary(
    tiny_model_dir: Path,
) -> None:
    network = await _network(tiny_model_dir)
    try:
        engine = network.models[0].engine
        first: list[str] = []
        async with _client(network, engine, first) as client:
            for i in range(4):
                result = await client.complete(_request(engine, DOCUMENT + f" question {i}:"))
            assert result.cached_tokens > 0
        assert len(set(first)) == 1, "one client's prompts sharing a prefix went to different nodes"
        holder = network.by_operator(first[0])
        await asyncio.sleep(0.1)  # a fresh heartbeat carries the summary (3 distinct requests saw the prefix)
        beat = holder.publisher.current().heartbeat
        assert beat.summary is not None and beat.summary.entries > 0
        fresh: list[str] = []
        async with _client(network, engine, fresh) as other:
            result = await other.complete(_request(engine, DOCUMENT + " another question:"))
        assert fresh == [holder.account.address]
        assert result.cached_tokens > 0
    finally:
        await _close(network)


async def test_a_loaded_node_is_avoided(tiny_model_dir: Path) -> None:
    network = await _network(tiny_model_dir)
    try:
        busy = network.models[0]
        params = SamplingParams(max_tokens=200, temperature=0.0)

        async def load(i: int) -> None:
            request = GenerationRequest(request_id=f"load-{i}", prompt=DOCUMENT + str(i), params=params)
            async for _ in busy.engine.generate(request):
                pass

        background = [asyncio.create_task(load(i)) for i in range(6)]
        try:
            while busy.engine.stats().running_requests + busy.engine.stats().queued_requests < 4:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.1)
            routes: list[str] = []
            async with _client(network, busy.engine, routes) as client:
                for i in range(3):
                    await client.complete(_request(busy.engine, f"{i}+{i}="))
            assert Counter(routes)[busy.account.address] == 0, routes
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
    finally:
        await _close(network)


async def test_forged_and_stale_heartbeats_make_a_node_silent_and_it_is_not_routed_to(tiny_model_dir: Path) -> None:
    forger = Account.create()
    network = await _network(tiny_model_dir, b={"signer": forger})
    try:
        honest, forged = network.models
        routes: list[str] = []
        async with _client(network, honest.engine, routes) as client:
            for i in range(4):
                await client.complete(_request(honest.engine, f"{i}+1="))
            assert client.heartbeats.rejected > 0
            assert client.heartbeats.silent(forged.account.address)
        assert set(routes) == {honest.account.address}
    finally:
        await _close(network)

    network = await _network(tiny_model_dir, b={"interval_s": 3600.0})
    try:
        fresh, stale = network.models
        routes = []
        config = ClientConfig(heartbeat_refresh_s=0.0, heartbeat_max_age_s=0.5)
        client = Client(
            network.directory(),
            config,
            tokenizer=fresh.engine.tokenize,
            on_route=lambda route: routes.append(route.destination.operator),
        )
        async with client:
            await client.heartbeats.refresh(network.directory().model_nodes)  # both answer now
            assert not client.heartbeats.silent(stale.account.address)
            await asyncio.sleep(0.7)  # the stale node keeps serving its first heartbeat, now too old
            for i in range(3):
                await client.complete(_request(fresh.engine, f"{i}+2="))
            assert client.heartbeats.silent(stale.account.address)
        assert set(routes) == {fresh.account.address}
    finally:
        await _close(network)


@pytest.mark.parametrize("policy", ["round_robin", "least_load", "prefix_only", "planetserve"])
async def test_every_policy_serves_requests_end_to_end(tiny_model_dir: Path, policy: str) -> None:
    network = await _network(tiny_model_dir)
    try:
        engine = network.models[0].engine
        routes: list[str] = []
        client = Client(
            network.directory(),
            ClientConfig(policy=policy, heartbeat_refresh_s=0.0),
            tokenizer=engine.tokenize,
            on_route=lambda route: routes.append(route.destination.operator),
        )
        async with client:
            results = [await client.complete(_request(engine, f"{i}+3=")) for i in range(4)]
        assert all(r.finish_reason in {"stop", "length"} for r in results)
        if policy == "round_robin":
            assert len(set(routes)) == 2
    finally:
        await _close(network)
