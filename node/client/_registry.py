"""Where a client's directory comes from: the on-chain registry, read through the ledger's event indexer.

The indexer is synchronous (web3.py); its sync runs in a worker thread so the client's event loop keeps streaming
replies while the registry is read. Each sync is incremental and reorg-safe (``ledger.Indexer``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from node.client._policy import NEUTRAL_REPUTATION
from node.overlay import Directory
from node.overlay._registry_index import RegistryIndex

if TYPE_CHECKING:
    from ledger import IndexedNode, Indexer


def indexer_sources(
    indexer: Indexer,
) -> tuple[Callable[[], Awaitable[Sequence[IndexedNode]]], Callable[[], Awaitable[Directory]]]:
    """(nodes, directory) read through an open ``indexer`` in a worker thread, synced afresh on each call: what a
    verifier needs (the registered nodes it audits, and the directory its ``Client`` routes by)."""

    async def nodes() -> Sequence[IndexedNode]:
        def read() -> Sequence[IndexedNode]:
            indexer.sync()
            return indexer.nodes()

        return await asyncio.to_thread(read)

    async def directory() -> Directory:
        return Directory.from_registry(await nodes())

    return nodes, directory


class RegistryDirectory:
    """A :data:`~node.client.DirectorySource` over the registry at ``rpc_url`` (index kept in ``db_url``).

    Its index is a :class:`~node.overlay._registry_index.RegistryIndex`: :meth:`close` releases the database now, or
    when a read under way ends (never blocking the event loop), and a closed directory refuses reads
    (``SessionClosed``) instead of opening the index again."""

    def __init__(self, rpc_url: str, *, deployment: Path | None = None, db_url: str = "sqlite://") -> None:
        self.rpc_url = rpc_url
        self.deployment = deployment
        self.db_url = db_url
        self._index = RegistryIndex(rpc_url, deployment, db_url)
        self._lock = asyncio.Lock()
        self._reputation: dict[str, float] = {}

    def _read(self) -> Directory:
        nodes = self._index.nodes()
        # On-chain reputation (fixed point, 1e6 = 1.0; neutral 0.5 until verifiers rate a node).
        self._reputation = {n.operator: n.reputation / 1e6 for n in nodes}
        return Directory.from_registry(nodes)

    def reputation(self, operator: str) -> float:
        """A node's on-chain reputation in [0, 1] as of the last read (neutral when unknown)."""
        return self._reputation.get(operator, NEUTRAL_REPUTATION)

    async def __call__(self) -> Directory:
        async with self._lock:
            return await asyncio.to_thread(self._read)

    def close(self) -> None:
        """Close the index database (idempotent)."""
        self._index.close()
