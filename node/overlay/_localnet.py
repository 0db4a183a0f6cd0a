"""A network of real overlay nodes on 127.0.0.1 (ephemeral ports) for tests, benchmarks and local demos.

Each node is a real aiohttp server (``web.AppRunner`` + ``TCPSite``) built by :func:`create_app`; nothing is mocked.
Every node gets a random 20-byte node id (standing in for its operator's address) and the nodes of a network share one
in-memory :class:`StaticPeerDirectory` (standing in for the registry): a relay forwards only to nodes listed there.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field, replace
from types import TracebackType

from aiohttp import web

from node.overlay import keys
from node.overlay._app import create_app
from node.overlay._config import OverlayConfig
from node.overlay._lifecycle import stop_all
from node.overlay._peers import Peer, PeerDirectory, StaticPeerDirectory
from node.overlay._receiver import ReplyHandler
from node.privacy import Hop, RelayDescriptor

#: Seconds a stopped node waits for its open exchanges: short, so that stopping one looks like a crash.
_STOP_GRACE_S = 0.1


@dataclass(slots=True)
class LocalNode:
    """One running node."""

    name: str
    config: OverlayConfig
    app: web.Application
    runner: web.AppRunner
    endpoint: str = ""
    running: bool = True
    node_id: bytes = field(default_factory=lambda: secrets.token_bytes(20))
    """Registry id standing in for the operator's address."""

    @property
    def overlay(self) -> web.Application:
        """The node's ``/overlay`` sub-application (its state: metrics, replay cache, receiver)."""
        return self.app[keys.OVERLAY_APP]

    @property
    def public_key(self) -> bytes:
        """The node's raw X25519 public key."""
        return self.config.x25519_public

    def descriptor(self, operator: str | None = None) -> RelayDescriptor:
        """This node as a relay descriptor (operator defaults to its own name)."""
        return RelayDescriptor(
            node_id="0x" + self.node_id.hex(),
            operator=operator or self.name,
            endpoint=self.endpoint,
            public_key=self.public_key,
        )

    def hop(self) -> Hop:
        """This node as an onion hop."""
        return Hop(node_id=self.node_id, public_key=self.public_key)

    def peer(self) -> Peer:
        """This node as a peer (what a directory lists and a client sends to)."""
        return Peer(node_id=self.node_id, endpoint=self.endpoint, public_key=self.public_key)

    async def stop(self) -> None:
        """Stop serving at once; exchanges in progress are cut (a crashed relay, as far as peers can tell)."""
        if self.running:
            self.running = False
            await self.runner.cleanup()


async def serve_ephemeral(app: web.Application) -> tuple[web.AppRunner, str]:
    """Serve ``app`` on 127.0.0.1 at a free port; returns the runner (``cleanup()`` stops it) and ``http://host:port``."""
    runner = web.AppRunner(app, shutdown_timeout=_STOP_GRACE_S, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


async def start_node(
    name: str,
    config: OverlayConfig,
    handler: ReplyHandler | None = None,
    *,
    peers: PeerDirectory | None = None,
    node_id: bytes | None = None,
) -> LocalNode:
    """Start one node on 127.0.0.1 with an ephemeral port. It forwards only to the nodes ``peers`` resolves (none
    when omitted); when ``peers`` is a :class:`StaticPeerDirectory` the node is added to it."""
    app = create_app(config, handler, peers=peers)
    runner, endpoint = await serve_ephemeral(app)
    node = LocalNode(name=name, config=config, app=app, runner=runner, endpoint=endpoint)
    if node_id is not None:
        node.node_id = node_id
    if isinstance(peers, StaticPeerDirectory):
        peers.add(node.peer())
    return node


@dataclass(slots=True)
class LocalNetwork:
    """``relays`` relay nodes plus one model node serving ``handler``; an async context manager."""

    relays: int
    handler: ReplyHandler
    template: OverlayConfig | None = None
    relay_nodes: list[LocalNode] = field(default_factory=list)
    model: LocalNode | None = None
    peers: StaticPeerDirectory = field(default_factory=StaticPeerDirectory)
    """The network's registry stand-in: every node started here is in it."""

    def _config(self, role: str) -> OverlayConfig:
        base = self.template or OverlayConfig(x25519_secret=secrets.token_bytes(32))
        return replace(base, x25519_secret=secrets.token_bytes(32), role="model" if role == "model" else "relay")

    async def __aenter__(self) -> LocalNetwork:
        try:
            for i in range(self.relays):
                self.relay_nodes.append(await start_node(f"relay{i}", self._config("relay"), peers=self.peers))
            self.model = await start_node("model", self._config("model"), self.handler, peers=self.peers)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def nodes(self) -> list[LocalNode]:
        """Every relay, then the model node."""
        return [*self.relay_nodes, *([self.model] if self.model else [])]

    async def close(self) -> None:
        """Stop every node, also when stopping one raises; then raise the first error.

        Why not a plain loop: one node whose stop fails would leave every node after it serving (its port, tasks and
        sessions left to the garbage collector, a ResourceWarning in whatever test runs next).
        """
        await stop_all(node.stop for node in self.nodes())

    @property
    def destination(self) -> Peer:
        """The model node as a peer (the final onion hop)."""
        assert self.model is not None, "network not started"
        return self.model.peer()

    def descriptors(self) -> list[RelayDescriptor]:
        """Every relay as a descriptor (each its own operator)."""
        return [n.descriptor() for n in self.relay_nodes]

    async def settle(self, timeout_s: float = 5.0) -> None:
        """Wait until no node is handling a request (reply streams still draining included).

        Benchmarks call it between requests: every node here shares one process and event loop, so work left over
        from one request would otherwise be billed to the next, which separate hosts would not do.
        """
        nodes = [n for n in self.nodes() if n.running]
        async with asyncio.timeout(timeout_s):
            while any(n.overlay[keys.RELAY_STATE].inflight for n in nodes):
                await asyncio.sleep(0.0005)

    def node_at(self, endpoint: str) -> LocalNode:
        """The relay serving ``endpoint``."""
        return next(n for n in self.relay_nodes if n.endpoint == endpoint)
