"""The OpenAI-compatible endpoint paying per request, driven by the official ``openai`` package: the cost in ``usage``
and "a retry on another node never pays twice", live.

Everything is real: anvil with ``PaymentChannels``, paid model nodes (tiny torch model behind a ``PaymentGate`` and
its SQLite voucher store), six relays on 127.0.0.1, the ``Client`` with a durable ``Wallet``, and the endpoint's
aiohttp server. The expected cost is computed here from the spec's rule (``ceil(price × tokens / 1000)``) and the
answer's own token counts, and checked against the node's book as well as the client's.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from node.client import Client, ClientConfig, ClientService, create_openai_app
from node.client._wallet import Wallet, cost
from node.inference import read_info
from node.overlay import Directory
from node.overlay._localnet import serve_ephemeral
from tests._paid_net import OTHER_NODE, PRICE, PaidNet, start_paid_net
from tests.fixtures.chain import ChainEnv
from tests.test_client_wallet import _wallet

PROMPT = "3+4=7\n10+5=15\n12+7="


@dataclass(slots=True)
class PaidEndpoint:
    base_url: str
    name: str
    nodes: list[PaidNet]
    wallet: Wallet


async def _endpoint(chain: ChainEnv, model_dir: Path, tmp_path: Path, *, nodes: int) -> AsyncIterator[PaidEndpoint]:
    info = read_info(model_dir)
    assert info is not None
    name = f"{info.name}@{info.revision}"
    async with contextlib.AsyncExitStack() as stack:  # closed last opened first, however the test or set-up ends
        first = await start_paid_net(chain, model_dir, tmp_path / "a.db")
        stack.push_async_callback(first.close)
        paid = [first]
        if nodes == 2:
            second = await start_paid_net(chain, model_dir, tmp_path / "b.db", net=first.net, node_index=OTHER_NODE)
            stack.push_async_callback(second.stop)
            paid.append(second)
        directory = Directory(relays=tuple(first.net.descriptors()), model_nodes=tuple(p.served() for p in paid))
        wallet = _wallet(chain, tmp_path / "client")
        stack.callback(wallet.close)
        # Round robin: of two requests, one starts on each node (so one of them meets the dead node first).
        config = ClientConfig(models=(name,), heartbeats=False, attempts=2, policy="round_robin")
        client = Client(directory, config, wallet=wallet)
        stack.push_async_callback(client.close)
        service = ClientService(client)
        await service.refresh()
        runner, url = await serve_ephemeral(create_openai_app(service))
        stack.push_async_callback(runner.cleanup)
        yield PaidEndpoint(base_url=url + "/v1", name=name, nodes=paid, wallet=wallet)


@pytest.fixture
async def one_node(chain: ChainEnv, tiny_model_dir: Path, tmp_path: Path) -> AsyncIterator[PaidEndpoint]:
    async for endpoint in _endpoint(chain, tiny_model_dir, tmp_path, nodes=1):
        yield endpoint


@pytest.fixture
async def two_nodes(chain: ChainEnv, tiny_model_dir: Path, tmp_path: Path) -> AsyncIterator[PaidEndpoint]:
    async for endpoint in _endpoint(chain, tiny_model_dir, tmp_path, nodes=2):
        yield endpoint


def _api(endpoint: PaidEndpoint) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=endpoint.base_url, api_key="unused", max_retries=0)


def _extra(usage: openai.types.CompletionUsage | None) -> tuple[int, str]:
    """(total tokens, cost_wei) of a usage object; checks the price field on the way."""
    assert usage is not None and usage.model_extra is not None
    assert usage.model_extra["price_per_1k_tokens_wei"] == str(PRICE)
    return usage.total_tokens, usage.model_extra["cost_wei"]


async def test_usage_carries_the_cost_in_wei_streamed_or_not_and_the_books_agree(one_node: PaidEndpoint) -> None:
    async with _api(one_node) as api:
        whole = await api.completions.create(model=one_node.name, prompt=PROMPT, max_tokens=4, temperature=0)
        stream = await api.chat.completions.create(
            model=one_node.name,
            messages=[{"role": "user", "content": "12+7="}],
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        plain = await api.completions.create(
            model=one_node.name, prompt=PROMPT, max_tokens=2, temperature=0, stream=True
        )
        plain_chunks = [chunk async for chunk in plain]
    tokens, charged = _extra(whole.usage)
    assert charged == str(cost(PRICE, tokens))
    assert chunks[-1].choices == []
    streamed_tokens, streamed_charge = _extra(chunks[-1].usage)
    assert streamed_charge == str(cost(PRICE, streamed_tokens))
    assert all(c.usage is None for c in plain_chunks)  # no include_usage: no usage chunk, as OpenAI does
    # Three answers paid; the client's book and the node's agree on what they cost.
    (paid,) = one_node.nodes
    (channel,) = one_node.wallet.channels()
    book = paid.store.book(channel.channel_id)
    assert book is not None and book.owed == channel.owed
    assert channel.owed > int(charged) + int(streamed_charge)  # the third (unstreamed usage) paid too
    assert paid.engine.generated == 3


async def test_a_retry_on_another_node_through_the_endpoint_never_pays_twice(two_nodes: PaidEndpoint) -> None:
    live, dead = two_nodes.nodes
    await dead.node.stop()  # killed before answering anything: every path to it fails before a reply
    charges: list[tuple[int, str]] = []
    async with _api(two_nodes) as api:
        for _ in range(2):
            done = await api.completions.create(model=two_nodes.name, prompt=PROMPT, max_tokens=4, temperature=0)
            charges.append(_extra(done.usage))
    assert all(charged == str(cost(PRICE, tokens)) for tokens, charged in charges)  # one answer, paid once
    by_node = {c.node: c for c in two_nodes.wallet.channels()}
    unseen, served = by_node[dead.served().operator], by_node[live.served().operator]
    # A voucher was signed for the dead node (the retry happened) and never counted: it never reached the node.
    assert unseen.last > 0 and (unseen.owed, unseen.in_flight) == (0, 0)
    assert dead.store.book(unseen.channel_id) is None and dead.engine.generated == 0
    assert (served.owed, served.in_flight) == (sum(int(c) for _, c in charges), 0)
    book = live.store.book(served.channel_id)
    assert book is not None and book.owed == served.owed and book.latest.cumulative_amount == served.last
    assert live.engine.generated == 2
