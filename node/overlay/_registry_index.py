"""A node's or client's own index of the on-chain registry: one ledger ``Indexer``, opened on first read, read on
worker threads, and closed without waiting for a read under way.

Model nodes (their peer directory and re-forwarding view) and clients (``node.client.RegistryDirectory``) all read the
registry this way; one class keeps the close-during-a-read rule in one place.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

from node.overlay._errors import SessionClosed

if TYPE_CHECKING:
    from ledger import IndexedNode, Indexer


class RegistryIndex:
    """The node's own index of the registry (one ledger ``Indexer`` into ``db_url``), opened on first read.

    Why a class: the index holds database connections (files, on SQLite) that only :meth:`close` releases; a node
    that stops, or fails before it serves, closes it rather than leave them to the garbage collector. Reads run on
    worker threads, one at a time per user; :meth:`close` never waits for a read under way (that could be a slow
    chain, and close runs on the event loop): that read closes the index when it ends. A closed index refuses reads.
    """

    def __init__(self, rpc_url: str, deployment: Path | None, db_url: str) -> None:
        self._rpc_url = rpc_url
        self._deployment = deployment
        self._db_url = db_url
        self._indexer: Indexer | None = None
        self._guard = threading.Lock()  # held only to read and set the fields below, never across I/O
        self._reads = 0
        self._closed = False

    def nodes(self) -> list[IndexedNode]:
        """Sync the index with the chain and return every indexed node (blocking: run it in a worker thread)."""
        from ledger import Indexer, connect, default_deployment_path, open_registry  # web3: only when serving

        with self._guard:
            if self._closed:
                raise SessionClosed("registry index")
            self._reads += 1
        try:
            if self._indexer is None:
                path = self._deployment
                if path is None:
                    path = default_deployment_path(connect(self._rpc_url).eth.chain_id)
                dep, registry = open_registry(self._rpc_url, path)
                self._indexer = Indexer(registry, dep, self._db_url)
            self._indexer.sync()
            return self._indexer.nodes()
        finally:
            with self._guard:
                self._reads -= 1
                release = self._closed and self._reads == 0
            if release:
                self._release()

    def close(self) -> None:
        """Release the index's database connections now, or when the read under way ends (idempotent)."""
        with self._guard:
            self._closed = True
            release = self._reads == 0
        if release:
            self._release()

    def _release(self) -> None:
        with self._guard:
            indexer, self._indexer = self._indexer, None
        if indexer is not None:
            indexer.close()
