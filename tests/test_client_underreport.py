"""A model node that under-reports its load gets less traffic, live: two model nodes with real torch engines on
real aiohttp servers on 127.0.0.1, six relays, the ``Client`` with the ``planetserve`` policy over 4 onion paths of 3
relays. One node is busy (its one engine slot taken, requests waiting) while its signed heartbeat says it is idle;
the other is idle and says so. Both heartbeats read the same, so only the client's own measurement (time to first
token per queued token, ``LoadTracker``) can tell them apart.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

from node.client import Client, ClientConfig
from tests.test_overlay_reforward import REQUEST_TIMEOUT_S, _net, _request, _side

BURST = 8


async def test_a_node_that_under_reports_its_load_gets_less_traffic(tiny_model_dir: Path) -> None:
    async with _net() as net:
        liar = await _side(net, tiny_model_dir, reforward=None, lie=True)
        honest = await _side(net, tiny_model_dir, reforward=None)
        await liar.make_busy()
        routes: list[str] = []
        client = Client(
            net.directory(),
            ClientConfig(heartbeat_refresh_s=0.0),
            tokenizer=honest.engine.tokenize,
            on_route=lambda route: routes.append(route.destination.operator),
        )
        async with client, asyncio.timeout(REQUEST_TIMEOUT_S * 2):
            await client.heartbeats.refresh(net.directory().model_nodes)
            said = client.heartbeats.latest(liar.account.address)
            assert said is not None and said.queued_tokens == 0 and said.queued_requests == 0
            assert liar.engine.stats().queued_requests >= 1  # the lie: requests are waiting there
            for _ in range(BURST):
                await client.complete(_request(honest, max_tokens=2))
            sent = Counter(routes)
            if sent[liar.account.address]:
                # It was tried and measured: its time per token is what it really costs, above the honest one's.
                slow = client.load.seconds_per_token(liar.account.address)
                assert slow > client.load.seconds_per_token(honest.account.address)
        assert sum(sent.values()) == BURST
        assert sent[liar.account.address] <= 2 < sent[honest.account.address], sent
        assert liar.served.count == sent[liar.account.address]
