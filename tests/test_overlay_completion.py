"""Completions end to end: a real torch engine behind a model node, real relays on 127.0.0.1, 4 onion paths of 3 hops,
and the JSON application protocol of ``docs/protocol.md`` §10 on top."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aiohttp
import pytest

from node.inference import EngineConfig, GenerationRequest, SamplingParams, TorchEngine
from node.overlay import (
    CompletionDelta,
    CompletionError,
    CompletionRequest,
    Directory,
    ModelNode,
    ReplyIncomplete,
    Route,
    complete,
    complete_routed,
    completion_handler,
    send_request,
)
from node.overlay._directory import common_suspects, suspect_relays
from node.overlay._localnet import LocalNetwork
from node.privacy import RelayDescriptor, public_key, select_paths
from planetserve import ModelId

PROMPT = "12+7="


async def _network(engine: TorchEngine) -> LocalNetwork:
    return LocalNetwork(relays=6, handler=completion_handler(engine))


def _paths(net: LocalNetwork) -> Sequence[Sequence[RelayDescriptor]]:
    return select_paths(net.descriptors(), 4, 3)


async def _all(stream: AsyncIterator[CompletionDelta]) -> list[CompletionDelta]:
    return [delta async for delta in stream]


async def _raw_reply(net: LocalNetwork, session: aiohttp.ClientSession, body: bytes) -> list[dict[str, object]]:
    data = b"".join([piece async for piece in send_request(session, body, _paths(net), net.destination)])
    return [json.loads(line) for line in data.splitlines()]


async def test_greedy_completion_over_onion_paths_matches_the_engine_run_locally(torch_engine: TorchEngine) -> None:
    params = SamplingParams(max_tokens=12, temperature=0.0)
    local = [
        c async for c in torch_engine.generate(GenerationRequest(request_id="local", prompt=PROMPT, params=params))
    ]
    request = CompletionRequest(model=torch_engine.model_id, prompt=PROMPT, max_tokens=12, temperature=0.0)
    async with await _network(torch_engine) as net, aiohttp.ClientSession() as session:
        deltas = await _all(complete(session, request, _paths(net), net.destination))
    assert "".join(d.text for d in deltas) == "".join(c.text for c in local)
    assert [t for d in deltas for t in d.token_ids] == [t for c in local for t in c.token_ids]
    # Per-token log-probs travel too (what a verifier compares), one per token.
    assert [lp for d in deltas for lp in d.logprobs] == pytest.approx([lp for c in local for lp in c.logprobs])
    assert sum(len(d.logprobs) for d in deltas) == sum(len(d.token_ids) for d in deltas)
    assert deltas[-1].finish_reason == local[-1].finish_reason
    assert [d.finish_reason is not None for d in deltas].count(True) == 1
    assert deltas[-1].completion_tokens == sum(len(c.token_ids) for c in local)
    assert deltas[-1].prompt_tokens == local[-1].prompt_tokens


async def test_repeated_prompt_reports_prefix_cache_hits_through_the_overlay(torch_engine: TorchEngine) -> None:
    prompt = "the quick brown fox jumps over the lazy dog; " * 6
    request = CompletionRequest(model=torch_engine.model_id, prompt=prompt, max_tokens=2, temperature=0.0)
    async with await _network(torch_engine) as net, aiohttp.ClientSession() as session:
        first = await _all(complete(session, request, _paths(net), net.destination))
        second = await _all(complete(session, request, _paths(net), net.destination))
    assert first[-1].cached_tokens == 0
    assert second[-1].cached_tokens > 0


async def test_out_of_range_sampling_parameter_is_an_error_naming_the_field(torch_engine: TorchEngine) -> None:
    request = CompletionRequest(model=torch_engine.model_id, prompt=PROMPT, temperature=5.0)
    async with await _network(torch_engine) as net, aiohttp.ClientSession() as session:
        with pytest.raises(CompletionError) as info:
            await _all(complete(session, request, _paths(net), net.destination))
    assert info.value.code == "invalid_params"
    assert info.value.param == "temperature"


async def test_request_for_another_model_is_refused(torch_engine: TorchEngine) -> None:
    request = CompletionRequest(model="0x" + "ab" * 32, prompt=PROMPT)
    async with await _network(torch_engine) as net, aiohttp.ClientSession() as session:
        with pytest.raises(CompletionError) as info:
            await _all(complete(session, request, _paths(net), net.destination))
    assert info.value.code == "model_not_served"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"not json at all", None),
        (b"[1, 2, 3]", None),
        (b'{"v": 1, "type": "completion", "model": "MODEL", "prompt": "hi", "max_tokens": "5"}', "max_tokens"),
        (b'{"v": 1, "type": "completion", "model": "MODEL", "prompt": "hi", "voucher": "x"}', "voucher"),
        (b'{"v": 3, "type": "completion", "model": "MODEL", "prompt": "hi"}', "v"),
        (b'{"v": 1, "type": "completion", "model": "0x12", "prompt": "hi"}', "model"),
        (b'{"v": 1, "type": "completion", "model": "MODEL", "prompt": ""}', "prompt"),
    ],
)
async def test_malformed_request_gets_one_error_line_and_the_model_does_not_run(
    torch_engine: TorchEngine, body: bytes, param: str | None
) -> None:
    body = body.replace(b"MODEL", torch_engine.model_id.encode())
    before = torch_engine.stats().prefill_tokens_computed + torch_engine.stats().prefill_tokens_cached
    async with await _network(torch_engine) as net, aiohttp.ClientSession() as session:
        lines = await _raw_reply(net, session, body)
    assert len(lines) == 1
    error = lines[0]["error"]
    assert isinstance(error, dict)
    assert error["code"] == "invalid_request"
    if param is not None:
        assert error["param"] == param
    after = torch_engine.stats().prefill_tokens_computed + torch_engine.stats().prefill_tokens_cached
    assert after == before


async def test_oversized_prompt_is_refused_without_running_the_model(torch_engine: TorchEngine) -> None:
    body = json.dumps({"model": torch_engine.model_id, "prompt": "x" * 65_537}).encode()
    async with await _network(torch_engine) as net, aiohttp.ClientSession() as session:
        lines = await _raw_reply(net, session, body)
    assert len(lines) == 1
    assert lines[0]["error"] == {
        "code": "invalid_request",
        "message": "String should have at most 65536 characters",
        "param": "prompt",
    }


async def test_prompt_longer_than_the_model_context_is_an_invalid_params_error(torch_engine: TorchEngine) -> None:
    request = CompletionRequest(model=torch_engine.model_id, prompt="7+8=15\n" * 600, max_tokens=4)
    async with await _network(torch_engine) as net, aiohttp.ClientSession() as session:
        with pytest.raises(CompletionError) as info:
            await _all(complete(session, request, _paths(net), net.destination))
    assert info.value.code == "invalid_params"
    assert info.value.param == "prompt"
    assert "7+8" not in str(info.value)  # the error names the field and its length, never the prompt's text


async def test_a_full_engine_answers_overloaded_instead_of_queueing_without_bound(tiny_model_dir: Path) -> None:
    engine = TorchEngine.from_folder(tiny_model_dir, EngineConfig(device="cpu", max_queue=1, max_running=1))
    request = CompletionRequest(model=engine.model_id, prompt=PROMPT, max_tokens=200, temperature=1.0, seed=1)
    try:
        async with await _network(engine) as net, aiohttp.ClientSession() as session:

            async def one() -> str:
                try:
                    await _all(complete(session, request, _paths(net), net.destination))
                except CompletionError as exc:
                    return exc.code
                return "ok"

            outcomes = await asyncio.gather(*(one() for _ in range(6)))
    finally:
        await engine.close()
    assert "overloaded" in outcomes
    assert "ok" in outcomes
    assert set(outcomes) <= {"ok", "overloaded"}


async def test_model_node_is_not_ready_once_its_engine_is_closed(tiny_model_dir: Path) -> None:
    from node.overlay import OverlayConfig
    from node.overlay._serve import create_model_app, serve_until

    engine = TorchEngine.from_folder(tiny_model_dir, EngineConfig(device="cpu"))
    app = create_model_app(OverlayConfig(x25519_secret=bytes(range(32)), role="model"), engine)
    stop = asyncio.Event()
    endpoints: list[str] = []
    server = asyncio.create_task(serve_until(app, host="127.0.0.1", port=0, stop=stop, on_ready=endpoints.append))
    try:
        while not endpoints:
            await asyncio.sleep(0.01)
        async with aiohttp.ClientSession() as session:
            async with session.get(endpoints[0] + "/overlay/readyz") as response:
                assert response.status == 200
            await engine.close()
            async with session.get(endpoints[0] + "/overlay/readyz") as response:
                assert response.status == 503
            async with session.get(endpoints[0] + "/overlay/healthz") as response:
                assert response.status == 200  # alive, just not ready
    finally:
        stop.set()
        await server


def _directory(net: LocalNetwork, model_id: ModelId) -> Directory:
    assert net.model is not None
    model = ModelNode(
        operator="0x" + net.model.node_id.hex(),
        endpoint=net.model.endpoint,
        public_key=net.model.public_key,
        model_id=model_id,
        price_per_1k_tokens=1000,
    )
    return Directory(relays=tuple(net.descriptors()), model_nodes=(model,))


async def test_a_request_is_rerouted_around_a_dead_relay(torch_engine: TorchEngine) -> None:
    request = CompletionRequest(model=torch_engine.model_id, prompt=PROMPT, max_tokens=4, temperature=0.0)
    async with (
        LocalNetwork(relays=6, handler=completion_handler(torch_engine)) as net,
        aiohttp.ClientSession() as session,
    ):
        directory = _directory(net, torch_engine.model_id)
        dead = net.relay_nodes[0]
        await dead.stop()
        for _ in range(3):
            routes: list[Route] = []
            async with asyncio.timeout(15):  # never the model node's 20 s assembly timeout: a hopeless try ends at once
                deltas = await _all(complete_routed(session, directory, request, on_route=routes.append))
            assert deltas[-1].finish_reason is not None
            # 4 paths of 3 over 6 relays use each relay twice, so the first try always loses 2 paths (more than
            # n - k = 1) before any reply; the second avoids every relay that could explain those failures.
            assert len(routes) == 2
            assert sum(dead.endpoint in [r.endpoint for r in p] for p in routes[0].paths) == 2
            assert not any(r.endpoint == dead.endpoint for p in routes[1].paths for r in p)


async def test_without_retries_a_dead_relay_fails_the_request_at_once(torch_engine: TorchEngine) -> None:
    request = CompletionRequest(model=torch_engine.model_id, prompt=PROMPT, max_tokens=4, temperature=0.0)
    async with (
        LocalNetwork(relays=6, handler=completion_handler(torch_engine)) as net,
        aiohttp.ClientSession() as session,
    ):
        await net.relay_nodes[0].stop()
        with pytest.raises(ReplyIncomplete) as info:
            async with asyncio.timeout(15):
                await _all(complete_routed(session, _directory(net, torch_engine.model_id), request, attempts=1))
        assert len(info.value.failed_early) == 2 and info.value.received == 0 and not info.value.started


def _relay(name: str) -> RelayDescriptor:
    return RelayDescriptor(
        node_id=name, operator=name, endpoint=f"http://127.0.0.1:{9000 + ord(name)}", public_key=public_key(b"k" * 32)
    )


def test_suspects_are_the_relays_that_can_explain_each_early_failure() -> None:
    a, b, c, d, e, f = (_relay(x) for x in "abcdef")
    model = ModelNode(
        operator="m",
        endpoint="http://127.0.0.1:9999",
        public_key=bytes(32),
        model_id=ModelId.ZERO,
        price_per_1k_tokens=1,
    )
    route = Route(destination=model, paths=((d, a, b), (c, e, d), (a, c, f), (b, e, f)))
    # Path 0's first hop failed itself; path 1's first hop blamed a hop behind it; path 2 started; path 3 in flight.
    failure = ReplyIncomplete(paths=4, received=0, failed_early=(0, 1), started=(2,), first_hop_failed=(0,))
    assert suspect_relays(route, failure) == {"d", "e"}  # "c" answered and path 2 proves "a", "c", "f" are up
    assert common_suspects(route, failure) == {"d"}


async def test_a_node_streaming_more_than_max_tokens_allows_is_cut_off(torch_engine: TorchEngine) -> None:
    """A lying model node streams deltas without end: the client stops reading at a bound set by ``max_tokens``
    (a user's client, the OpenAI endpoint and a verifier collecting an audit never hold an unbounded reply)."""
    sent = 0

    async def endless(_body: bytes) -> AsyncIterator[bytes]:
        nonlocal sent
        for i in range(100_000):
            sent += 1
            yield (
                CompletionDelta(
                    text="x" * 900,
                    token_ids=(1,),
                    finish_reason=None,
                    prompt_tokens=3,
                    completion_tokens=min(i, 4),
                    cached_tokens=0,
                    logprobs=(-0.1,),
                )
                .model_dump_json()
                .encode()
                + b"\n"
            )
            await asyncio.sleep(0)

    async def counting(_body: bytes) -> AsyncIterator[bytes]:
        # A node that claims more tokens than asked for in its counts is cut off at once.
        yield (
            CompletionDelta(
                text="x", token_ids=(1,), finish_reason=None, prompt_tokens=3, completion_tokens=9, cached_tokens=0
            )
            .model_dump_json()
            .encode()
            + b"\n"
        )

    request = CompletionRequest(model=torch_engine.model_id, prompt=PROMPT, max_tokens=4, temperature=0.0)
    async with LocalNetwork(relays=6, handler=endless) as net, aiohttp.ClientSession() as session:
        with pytest.raises(CompletionError) as caught:
            await _all(complete(session, request, _paths(net), net.destination))
    assert caught.value.code == "bad_reply" and "longer than" in str(caught.value)
    async with LocalNetwork(relays=6, handler=counting) as net, aiohttp.ClientSession() as session:
        with pytest.raises(CompletionError) as counted:
            await _all(complete(session, request, _paths(net), net.destination))
    assert counted.value.code == "bad_reply" and "more than the 4 tokens" in str(counted.value)
