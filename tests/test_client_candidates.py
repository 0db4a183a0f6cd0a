"""The ``Client`` weighs a bounded random sample of candidates per request (``ClientConfig.candidates``), plus the
nodes it remembers for the prompt's prefix, and fetches only their heartbeats.

Through the transport seam (``Client(transport=...)``): 40 model nodes whose real signed heartbeats (each node's own
key, zero load) a transport serves from memory while counting which endpoints were fetched per request; its
``send`` answers with one final delta. Forty aiohttp servers would prove nothing more about what the client fetches.
"""

from __future__ import annotations

import random
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from eth_account import Account

from node.client import Client, ClientConfig
from node.client._client import MAX_PREFIX_HOLDERS
from node.inference import InvalidParams
from node.inference._prefix import CHUNK_TOKENS
from node.overlay import CompletionDelta, CompletionRequest, Directory, ModelNode, Route
from node.overlay._heartbeat import Heartbeat, sign_heartbeat
from node.privacy import RelayDescriptor
from planetserve import ModelId

MODEL = ModelId.of("tiny@1")
NODES = 40
SAMPLE = 16
#: A prompt prefix of four whole chunks (byte tokens) shared by the requests; each adds its own tail.
PREFIX = "p" * (4 * CHUNK_TOKENS)


@dataclass(slots=True)
class CountingTransport:
    """Serves each node's signed heartbeat and records the endpoints fetched since the last :meth:`take`."""

    beats: dict[str, bytes]
    fetched: list[str] = field(default_factory=list)

    def take(self) -> list[str]:
        taken, self.fetched = self.fetched, []
        return taken

    async def fetch_heartbeat(self, endpoint: str) -> bytes:
        self.fetched.append(endpoint)
        return self.beats[endpoint]

    async def send(self, request: CompletionRequest, route: Route) -> AsyncIterator[CompletionDelta]:
        yield CompletionDelta(
            text="x", token_ids=(1,), finish_reason="length", prompt_tokens=1, completion_tokens=1, cached_tokens=0
        )

    async def close(self) -> None:
        return None


def _network() -> tuple[Directory, CountingTransport]:
    nodes: list[ModelNode] = []
    beats: dict[str, bytes] = {}
    for i in range(NODES):
        account = Account.create()
        endpoint = f"http://127.0.0.1:{20_000 + i}"
        nodes.append(
            ModelNode(
                operator=account.address,
                endpoint=endpoint,
                public_key=secrets.token_bytes(32),
                model_id=MODEL,
                price_per_1k_tokens=0,
            )
        )
        beat = Heartbeat(
            node=account.address,
            model=MODEL,
            seq=1,
            issued_at_ms=int(time.time() * 1000),
            queued_requests=0,
            running_requests=0,
            queued_tokens=0,
            ttft_ms_p50=0.0,
        )
        beats[endpoint] = sign_heartbeat(beat, account).model_dump_json().encode()
    relays = []
    for i in range(4):
        operator = Account.create().address
        relays.append(
            RelayDescriptor(
                node_id=operator,
                operator=operator,
                endpoint=f"http://127.0.0.1:{21_000 + i}",
                public_key=secrets.token_bytes(32),
            )
        )
    return Directory(relays=tuple(relays), model_nodes=tuple(nodes)), CountingTransport(beats)


def _client(
    directory: Directory,
    transport: CountingTransport,
    routes: list[Route],
    *,
    refresh_s: float,
    candidates: int = SAMPLE,
) -> Client:
    return Client(
        directory,
        ClientConfig(paths=2, hops=1, heartbeat_max_age_s=60.0, heartbeat_refresh_s=refresh_s, candidates=candidates),
        transport=transport,
        on_route=routes.append,
        tokenizer=lambda prompt: list(prompt.encode()),
        rng=random.Random(11),
    )


def _request(tail: str) -> CompletionRequest:
    return CompletionRequest(model=MODEL, prompt=PREFIX + tail, max_tokens=1, temperature=0.0)


async def test_each_request_fetches_a_bounded_sample_plus_the_prefix_holder_and_every_node_is_sampled() -> None:
    directory, transport = _network()
    routes: list[Route] = []
    endpoints = {m.operator: m.endpoint for m in directory.model_nodes}
    seen: set[str] = set()
    async with _client(directory, transport, routes, refresh_s=0.0) as client:
        await client.complete(_request("first"))
        transport.take()
        for i in range(60):
            holder = endpoints[routes[-1].destination.operator]  # where this client last sent the shared prefix
            await client.complete(_request(f"tail {i}"))
            fetched = transport.take()
            assert len(fetched) == len(set(fetched))
            assert SAMPLE <= len(fetched) <= SAMPLE + MAX_PREFIX_HOLDERS
            assert holder in fetched
            assert endpoints[routes[-1].destination.operator] in fetched  # it routes among what it weighed
            seen.update(fetched)
        # A prompt sharing nothing with what this client sent: the sample alone.
        await client.complete(CompletionRequest(model=MODEL, prompt="q" * 80, max_tokens=1, temperature=0.0))
        assert len(transport.take()) == SAMPLE
    assert seen == set(endpoints.values())  # every node is weighed now and then


async def test_a_pinned_request_samples_its_set_then_adds_its_target() -> None:
    directory, transport = _network()
    routes: list[Route] = []
    endpoints = {m.operator: m.endpoint for m in directory.model_nodes}
    async with _client(directory, transport, routes, refresh_s=0.0) as client:
        for target in list(directory.model_nodes)[:10]:
            await client.complete(_request(target.operator), to=target.operator.lower())
            fetched = transport.take()
            assert routes[-1].destination.operator == target.operator
            assert endpoints[target.operator] in fetched
            # The target hides among a set as large as any request's, never polled alone.
            assert SAMPLE <= len(fetched) <= SAMPLE + MAX_PREFIX_HOLDERS + 1


async def test_candidates_zero_weighs_every_serving_node() -> None:
    directory, transport = _network()
    routes: list[Route] = []
    async with _client(directory, transport, routes, refresh_s=0.0, candidates=0) as client:
        for i in range(3):
            await client.complete(_request(str(i)))
            assert len(set(transport.take())) == NODES


async def test_a_heartbeat_fetched_within_the_refresh_interval_is_not_fetched_again() -> None:
    directory, transport = _network()
    routes: list[Route] = []
    async with _client(directory, transport, routes, refresh_s=600.0) as client:
        fetched: list[str] = []
        for i in range(20):
            await client.complete(_request(str(i)))
            fetched += transport.take()
    # Each request samples anew; only nodes not fetched yet are fetched, and each at most once.
    assert len(fetched) == len(set(fetched)) > SAMPLE


def test_a_negative_candidate_count_is_refused() -> None:
    with pytest.raises(InvalidParams):
        ClientConfig(candidates=-1)
