"""A relay killed mid-stream, with separate processes: a model node and six relays as ``ps-node serve`` processes,
registered on a real anvil; the ``Client`` streams a long greedy completion over 4 onion paths of 3 relays and, once
the first delta is in, one relay of the route gets SIGKILL. The reply still comes back on the paths that survive
(every live path carries every chunk): the client gets the whole answer, the engine's own greedy output token for
token, once (no duplicate delta, one final delta), and part of it after the kill. The model node runs with
``--reforward-bound`` (``PS_REFORWARD_BOUND``) and says so at ``/metrics``.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from node.client import Client, ClientConfig, load_tokenizer
from node.client._registry import RegistryDirectory
from node.inference import EngineConfig, GenerationRequest, SamplingParams, TorchEngine
from node.overlay import CompletionDelta, CompletionRequest, Route
from node.testing import NodeSpec, ProcessNetwork
from tests.fixtures.chain import ChainEnv

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


@pytest.fixture
def network(chain: ChainEnv, tiny_model_dir: Path, tmp_path: Path) -> Iterator[ProcessNetwork]:
    specs = [NodeSpec(name="model-1", role="model", account_index=1, stake_wei=2 * 10**18, price_per_1k_tokens=0)]
    specs += [NodeSpec(name=f"relay-{i}", role="relay", account_index=1 + i, stake_wei=2 * 10**17) for i in range(1, 7)]
    net = ProcessNetwork(
        rpc_url=chain.rpc_url,
        deployment=chain.deployment_path,
        state_root=tmp_path / "nodes",
        nodes=specs,
        model_dir=tiny_model_dir,
        extra_env={"PS_REFORWARD_BOUND": "4"},  # re-forwarding wired in ps-node serve (no peer here: it never fires)
    )
    net.start()
    try:
        yield net
    finally:
        net.stop()


async def test_a_relay_killed_mid_stream_and_the_stream_completes_once(
    network: ProcessNetwork, chain: ChainEnv, tiny_model_dir: Path, tmp_path: Path
) -> None:
    prompt, expected = await _long_greedy(tiny_model_dir)
    assert len(expected) >= 32, "no candidate prompt gives a long enough greedy answer to kill a relay during"
    model = next(n for n in network.running if n.spec.role == "model")
    relays = {n.operator.lower(): n.spec.name for n in network.running if n.spec.role == "relay"}
    routes: list[Route] = []
    directory = RegistryDirectory(
        chain.rpc_url, deployment=chain.deployment_path, db_url=f"sqlite:///{tmp_path / 'client.sqlite'}"
    )
    client = Client(
        directory,
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
    async with aiohttp.ClientSession() as session, session.get(model.endpoint + "/metrics") as response:
        exposition = await response.text()
    assert 'planetserve_reforwards_total{outcome="no_peer"} 0.0' in exposition  # under its bound: served itself
