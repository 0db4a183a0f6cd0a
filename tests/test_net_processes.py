"""Faults with separate processes: two model nodes and six relays as ``ps-node serve`` processes, registered on a
real anvil of this module's own; the ``Client`` sends over 4 onion paths of 3 relays.

- A node that under-reports its load gets less traffic: one model node is dishonest (``tests/dishonest_node.py``:
  its signed heartbeat always says idle while its engine runs one request at a time and a background client keeps
  requests waiting there); over a burst, the ``planetserve`` policy sends it less than the honest one, caught by the
  client's own time-to-first-token measurement, since both heartbeats read the same.
- A relay killed mid-stream: the client streams a long greedy completion from the honest node and, once the first
  delta is in, one relay of the route gets SIGKILL. The reply still comes back on the paths that survive (every live
  path carries every chunk): the whole answer, the engine's own greedy output token for token, once (no duplicate
  delta, one final delta), and part of it after the kill. The model nodes run with ``--reforward-bound``
  (``PS_REFORWARD_BOUND``) and say so at ``/metrics``.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.client import Client, ClientConfig, load_tokenizer
from node.client._registry import RegistryDirectory
from node.inference import EngineConfig, GenerationRequest, SamplingParams, TorchEngine
from node.overlay import CompletionDelta, CompletionRequest, Route
from node.testing import NodeSpec, ProcessNetwork
from tests._process_net import metric, node_named, only_model, own_chain, process_network
from tests.dishonest_node import PRELUDE

HONEST, LIAR = "model-honest", "model-liar"
BURST = 12

#: Candidate prompts: the first whose greedy answer runs to the length limit is streamed (a freshly trained tiny
#: model may end some of them early with EOS).
PROMPTS = ("the quick brown fox", "12+07=", "hello there, ", "and runs far away ", "a b c d e f ")
MAX_TOKENS = 160


async def _long_greedy(model_dir: Path) -> tuple[str, tuple[int, ...]]:
    """A prompt whose greedy answer is long, and that answer's token ids (the engine's own output)."""
    engine = TorchEngine.from_folder(model_dir, EngineConfig(device="cpu"))
    try:
        best: tuple[str, tuple[int, ...]] = ("", ())
        for i, prompt in enumerate(PROMPTS):
            params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
            tokens: list[int] = []
            async for chunk in engine.generate(GenerationRequest(request_id=f"ref-{i}", prompt=prompt, params=params)):
                tokens.extend(chunk.token_ids)
            if len(tokens) > len(best[1]):
                best = (prompt, tuple(tokens))
            if len(tokens) >= MAX_TOKENS:
                break
        return best
    finally:
        await engine.close()


@pytest.fixture(scope="module")
def chain_here(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """An anvil and a deployment of this module's own: its nodes stay registered across its tests."""
    with own_chain(tmp_path_factory, accounts=12) as chain:
        yield chain


@pytest.fixture(scope="module")
def network(
    chain_here: tuple[str, Path], tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProcessNetwork]:
    specs = [
        NodeSpec(name=HONEST, role="model", account_index=1, stake_wei=2 * 10**18),
        NodeSpec(name=LIAR, role="model", account_index=2, stake_wei=2 * 10**18, prelude=PRELUDE),
    ]
    specs += [NodeSpec(name=f"relay-{i}", role="relay", account_index=2 + i, stake_wei=2 * 10**17) for i in range(1, 7)]
    # Re-forwarding wired in ps-node serve; above what these tests queue, so it never fires here.
    with process_network(
        chain_here, tiny_model_dir, tmp_path_factory, specs, extra_env={"PS_REFORWARD_BOUND": "8"}
    ) as net:
        yield net


async def test_a_node_that_under_reports_its_load_gets_less_traffic(
    network: ProcessNetwork, chain_here: tuple[str, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    rpc_url, deployment = chain_here
    honest, liar = node_named(network, HONEST), node_named(network, LIAR)
    tokenizer = load_tokenizer(tiny_model_dir)
    long_prompt, _ = await _long_greedy(tiny_model_dir)  # background requests that keep the liar's one slot long
    background_index = RegistryDirectory(rpc_url, deployment=deployment, db_url=f"sqlite:///{tmp_path / 'bg.sqlite'}")
    index = RegistryDirectory(rpc_url, deployment=deployment, db_url=f"sqlite:///{tmp_path / 'client.sqlite'}")
    load = Client(only_model(background_index, liar.operator), ClientConfig(heartbeats=False), tokenizer=tokenizer)
    routes: list[str] = []  # every try's destination
    served: list[str] = []  # each request's answering one
    client = Client(
        index,
        ClientConfig(heartbeat_refresh_s=0.0),
        tokenizer=tokenizer,
        on_route=lambda route: routes.append(route.destination.operator),
    )
    stop = asyncio.Event()

    async def keep_busy() -> None:
        request = CompletionRequest(model=liar.model_id, prompt=long_prompt, max_tokens=MAX_TOKENS, temperature=0.0)
        while not stop.is_set():
            await load.complete(request)

    busy: list[asyncio.Task[None]] = []
    try:
        async with load, client, asyncio.timeout(240):
            # Stopped before the clients close: a background request started after ``load`` closed would fail.
            busy = [asyncio.create_task(keep_busy()) for _ in range(3)]
            try:
                while await metric(liar.endpoint, "planetserve_engine_queued_requests") < 1:
                    await asyncio.sleep(0.1)
                # Warm the honest node's engine (its first forward passes are slow) through a client of its own, so
                # that what the burst's client measures is the nodes' load, not a cold start.
                warm = CompletionRequest(model=honest.model_id, prompt="0+0=", max_tokens=2, temperature=0.0)
                async with Client(
                    only_model(index, honest.operator), ClientConfig(heartbeats=False), tokenizer=tokenizer
                ) as w:
                    await w.complete(warm)
                await client.heartbeats.refresh((await client.directory()).model_nodes)
                said = client.heartbeats.latest(liar.operator)
                assert (
                    said is not None and said.queued_requests == said.queued_tokens == said.decode_backlog_tokens == 0
                )
                for i in range(BURST):
                    request = CompletionRequest(model=honest.model_id, prompt=f"{i}+1=", max_tokens=2, temperature=0.0)
                    tried = len(routes)
                    await client.complete(request)
                    # The try that answered is the request's last route; an earlier one failed before any path answered
                    # (a relay slow to answer on a loaded machine) and was re-routed, and measured nothing.
                    served.append(routes[-1])
                    assert len(routes) > tried
                if liar.operator in served:
                    # It answered, so it was measured: its time per token is what it really costs, above the
                    # honest one's.
                    assert client.load.seconds_per_token(liar.operator) > client.load.seconds_per_token(honest.operator)
            finally:
                stop.set()
                for task in busy:
                    task.cancel()
                await asyncio.gather(*busy, return_exceptions=True)
    finally:
        index.close()
        background_index.close()
    sent = Counter(served)
    assert sum(sent.values()) == BURST
    # Measured here: 11 of 12 to the honest node in most runs, 8 of 12 at worst on a loaded machine.
    assert sent[liar.operator] <= 4 < sent[honest.operator], sent
    print(f"burst of {BURST}: honest {sent[honest.operator]}, under-reporting {sent[liar.operator]}")


async def test_a_relay_killed_mid_stream_and_the_stream_completes_once(
    network: ProcessNetwork, chain_here: tuple[str, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    prompt, expected = await _long_greedy(tiny_model_dir)
    assert len(expected) >= 32, "no candidate prompt gives a long enough greedy answer to kill a relay during"
    rpc_url, deployment = chain_here
    model = node_named(network, HONEST)
    relays = {n.operator.lower(): n.spec.name for n in network.running if n.spec.role == "relay"}
    routes: list[Route] = []
    directory = RegistryDirectory(rpc_url, deployment=deployment, db_url=f"sqlite:///{tmp_path / 'client.sqlite'}")
    client = Client(
        only_model(directory, model.operator),
        ClientConfig(heartbeats=False),
        tokenizer=load_tokenizer(tiny_model_dir),
        on_route=routes.append,
    )
    request = CompletionRequest(model=model.model_id, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0)
    deltas: list[CompletionDelta] = []
    after_kill = 0
    killed = ""
    try:
        async with client:
            async for delta in client.stream(request):
                deltas.append(delta)
                if killed:
                    after_kill += len(delta.token_ids)
                    continue
                # The first delta is in: kill a relay that carries some paths of this reply, but not every one.
                (route,) = routes
                on_paths = Counter(node for path in route.paths for node in {r.node_id.lower() for r in path})
                node_id, count = min(on_paths.items(), key=lambda item: item[1])
                assert count < len(route.paths)
                killed = relays[node_id]
                started = time.monotonic()
                await asyncio.to_thread(network.kill, killed)
                assert time.monotonic() - started < 10
    finally:
        directory.close()
    assert killed and not next(n for n in network.running if n.spec.name == killed).alive()
    assert len(routes) == 1, "the client retried: the stream did not survive the kill"
    finals = [d for d in deltas if d.finish_reason is not None]
    assert len(finals) == 1 and deltas[-1] is finals[0]
    assert tuple(t for d in deltas for t in d.token_ids) == expected  # whole, in order, no duplicate delta
    assert after_kill > 0, "the whole answer had arrived before the kill: nothing was proven"
    assert [n.spec.name for n in network.crashed()] == [killed]
    # Under its bound: it served the request itself.
    assert await metric(model.endpoint, 'planetserve_reforwards_total{outcome="no_peer"}', default=None) == 0.0
