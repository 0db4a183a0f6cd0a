"""``RegistryPeerDirectory``: the cloves of one request that miss together all wait for the one registry read."""

from __future__ import annotations

import asyncio
import secrets
import threading
import time

from eth_account import Account

from ledger import IndexedNode, Role, Wei
from node.overlay._peers import RegistryPeerDirectory
from node.privacy import public_key
from planetserve import ModelId


def _node(address: str) -> IndexedNode:
    return IndexedNode(
        operator=address,
        role=Role.RELAY,
        endpoint="http://127.0.0.1:9",
        x25519_public_key=public_key(secrets.token_bytes(32)),
        model_id=ModelId.ZERO,
        price_per_1k_tokens=Wei(0),
        stake=Wei(10**18),
        status="active",
        active=True,
        unbonding_ends_at=0,
    )


async def test_lookups_that_miss_during_a_refresh_wait_for_it_and_the_rate_limit_holds() -> None:
    address = Account.create().address
    registered = threading.Event()
    reads = 0

    def source() -> list[IndexedNode]:  # the registry as the indexer reads it (slowly): the directory's neighbour
        nonlocal reads
        reads += 1
        time.sleep(0.3)
        return [_node(address)] if registered.is_set() else []

    directory = RegistryPeerDirectory(source, min_refresh_interval_s=2.0)
    try:
        await directory.refresh()  # the node starts before the registration
        registered.set()
        await asyncio.sleep(2.05)
        node_id = bytes.fromhex(address[2:])
        # Four cloves of one request name the new node at once: one read, and every one of them resolves.
        found = await asyncio.gather(*(directory.resolve(node_id) for _ in range(4)))
        assert all(peer is not None and peer.node_id == node_id for peer in found)
        assert reads == 2
        # Unknown ids right after cannot make the node read the registry again (at most one read per 2 s).
        assert await directory.resolve(secrets.token_bytes(20)) is None
        assert reads == 2
    finally:
        directory.close()
