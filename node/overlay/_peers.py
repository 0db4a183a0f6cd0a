"""A node's own view of the registry: which node ids it may send to, and where they are (``docs/protocol.md`` §5.4
step 8, §7).

Why: an onion slot names the next hop by its 20-byte registry id, never by URL, so a packet cannot make a relay dial
an internal address, scan ports or fetch a page for the sender. The relay resolves the id here; an id it does not know
(or that the registry no longer routes: unbonding, jailed, deregistered) is refused with a counted reason before any
connection is opened. :class:`StaticPeerDirectory` is the in-memory directory (tests, local networks);
:class:`RegistryPeerDirectory` is fed from the ledger's indexer and refreshed periodically (``ps-node serve``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from aiohttp import web

from node.privacy import Hop, InvalidPrivacyParam, key_id
from node.privacy._paths import check_endpoint

if TYPE_CHECKING:
    from ledger import IndexedNode

log = logging.getLogger(__name__)

#: Longest endpoint accepted from the registry, bytes.
MAX_ENDPOINT_LEN = 256


@dataclass(frozen=True, slots=True, kw_only=True)
class Peer:
    """A registered node as another node reaches it."""

    node_id: bytes
    """20-byte registry id (the operator's Ethereum address)."""
    endpoint: str
    """``http://host:port`` from the registry, at most 256 ASCII bytes."""
    public_key: bytes = field(repr=False)
    """Raw 32-byte X25519 onion public key from the registry."""

    def __post_init__(self) -> None:
        Hop(node_id=self.node_id, public_key=self.public_key)  # validates both lengths
        check_endpoint(self.endpoint, max_bytes=MAX_ENDPOINT_LEN)

    @property
    def key_id(self) -> bytes:
        """The onion key's 8-byte id (§5.1)."""
        return key_id(self.public_key)

    def hop(self) -> Hop:
        """This node as an onion hop."""
        return Hop(node_id=self.node_id, public_key=self.public_key)

    @classmethod
    def from_indexed(cls, node: IndexedNode) -> Peer:
        """The peer of an indexed registry entry (raises ``InvalidPrivacyParam`` when unusable on the overlay)."""
        return cls(
            node_id=bytes.fromhex(node.operator.removeprefix("0x")),
            endpoint=node.endpoint,
            public_key=node.x25519_public_key,
        )


class PeerDirectory(Protocol):
    """Resolves a registry id to a routable peer; ``None`` means "not a node I may send to"."""

    async def resolve(self, node_id: bytes) -> Peer | None:
        """The routable peer with id ``node_id``, or ``None``."""
        ...


class StaticPeerDirectory:
    """An in-memory directory: exactly the peers it was given (tests, local networks, benchmarks)."""

    __slots__ = ("_peers",)

    def __init__(self, peers: Iterable[Peer] = ()) -> None:
        self._peers: dict[bytes, Peer] = {}
        self.replace(peers)

    def __len__(self) -> int:
        return len(self._peers)

    def replace(self, peers: Iterable[Peer]) -> None:
        """Forget every peer, then hold ``peers``."""
        self._peers = {p.node_id: p for p in peers}

    def add(self, peer: Peer) -> None:
        """Hold ``peer`` (replacing one with the same id)."""
        self._peers[peer.node_id] = peer

    def remove(self, node_id: bytes) -> None:
        """Forget ``node_id`` (no error when absent)."""
        self._peers.pop(node_id, None)

    def get(self, node_id: bytes) -> Peer | None:
        """The peer with id ``node_id``, if held."""
        return self._peers.get(node_id)

    async def resolve(self, node_id: bytes) -> Peer | None:
        return self._peers.get(node_id)


def peers_from_registry(nodes: Iterable[IndexedNode]) -> list[Peer]:
    """The routable relays and model nodes of an indexed registry, as peers (unusable entries skipped, logged)."""
    from ledger import Role  # web3 is heavy: only a node that reads the registry pays for it

    peers = []
    for node in nodes:
        if not node.active or node.role not in (Role.RELAY, Role.MODEL):
            continue
        try:
            peers.append(Peer.from_indexed(node))
        except (InvalidPrivacyParam, ValueError):
            log.info("skipping %s: unusable on the overlay", node.operator)
    return peers


class RegistryPeerDirectory:
    """The registry as this node last read it through ``source`` (e.g. ``Indexer.sync()`` then ``nodes()``).

    ``source`` runs on one worker thread of its own (it does blocking chain and database I/O), at most once per
    ``min_refresh_interval_s``; :meth:`run` refreshes every ``refresh_interval_s``, and a lookup that misses refreshes
    at once if the last refresh is older than ``min_refresh_interval_s`` (a node registered a moment ago becomes
    reachable without waiting a whole interval, and unknown ids cannot make this node hammer its RPC endpoint).
    Each refresh is bounded by ``refresh_timeout_s``; a failed refresh keeps the previous view.
    """

    def __init__(
        self,
        source: Callable[[], Iterable[IndexedNode]],
        *,
        refresh_interval_s: float = 15.0,
        min_refresh_interval_s: float = 2.0,
        refresh_timeout_s: float = 20.0,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self._source = source
        self._on_close = on_close
        """What :meth:`close` releases besides the worker (the source's index), None: nothing."""
        self._view = StaticPeerDirectory()
        self._refresh_interval_s = refresh_interval_s
        self._min_refresh_interval_s = min_refresh_interval_s
        self._refresh_timeout_s = refresh_timeout_s
        self._last_refresh = -float("inf")
        self._lock = asyncio.Lock()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="peer-directory")
        self.refreshes = 0
        """Successful refreshes so far."""

    def __len__(self) -> int:
        return len(self._view)

    async def refresh(self) -> bool:
        """Read the registry again; ``False`` (the previous view kept) when the read failed or timed out."""
        async with self._lock:
            self._last_refresh = time.monotonic()
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(self._refresh_timeout_s):
                    nodes = await loop.run_in_executor(self._executor, lambda: list(self._source()))
            except Exception as exc:  # a chain or database error must not take the relay down
                log.warning("registry refresh failed: %s", type(exc).__name__)
                return False
            self._view.replace(peers_from_registry(nodes))
            self.refreshes += 1
            return True

    async def resolve(self, node_id: bytes) -> Peer | None:
        peer = self._view.get(node_id)
        if peer is not None:
            return peer
        if self._lock.locked():
            # A refresh is under way (another packet missed a moment ago): its view is the freshest there will be,
            # so wait for it rather than refuse. The cloves of one request reach a relay together, and all of them
            # name nodes registered since the last read.
            async with self._lock:
                pass
            return self._view.get(node_id)
        if time.monotonic() - self._last_refresh >= self._min_refresh_interval_s:
            await self.refresh()
        return self._view.get(node_id)

    async def run(self) -> None:
        """Refresh every ``refresh_interval_s`` until cancelled."""
        while True:
            await self.refresh()
            await asyncio.sleep(self._refresh_interval_s)

    def close(self) -> None:
        """Stop the worker thread (a refresh in progress finishes first), then run ``on_close`` (idempotent only if
        ``on_close`` is)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._on_close is not None:
            self._on_close()

    def cleanup_ctx(self) -> Callable[[web.Application], AsyncIterator[None]]:
        """A cleanup context that refreshes in the background while the application runs."""

        async def ctx(_app: web.Application) -> AsyncIterator[None]:
            task = asyncio.get_running_loop().create_task(self.run())
            yield
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self.close()

        return ctx
