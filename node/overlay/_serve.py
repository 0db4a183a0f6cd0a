"""Running a node process: the model node's application (engine included) and the serve-until-stopped loop that
``ps-node serve`` uses."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from node.inference import Engine
from node.overlay import keys
from node.overlay._app import create_app
from node.overlay._completion import RequestObserver, completion_handler
from node.overlay._config import OverlayConfig
from node.overlay._directory import Directory
from node.overlay._heartbeat import HEARTBEAT_PATH, HeartbeatPublisher, heartbeat_route
from node.overlay._peers import PeerDirectory, RegistryPeerDirectory
from node.overlay._registry_index import RegistryIndex

if TYPE_CHECKING:
    from node.overlay._payments import Payments
    from node.overlay._reforward import Reforwarder

log = logging.getLogger(__name__)

#: Seconds open exchanges get to finish when the node stops.
SHUTDOWN_GRACE_S = 5.0


def registry_peer_directory(
    rpc_url: str, deployment: Path | None, db_url: str, *, refresh_interval_s: float = 15.0
) -> RegistryPeerDirectory:
    """The node's own view of the registry, read through the ledger's indexer into ``db_url`` and refreshed every
    ``refresh_interval_s`` (and on a miss, at most every 2 s). Nothing connects until the first refresh, so a node
    whose chain is down still starts; it then forwards nothing until the registry can be read. Its ``close()``
    (which its cleanup context runs) closes the index too."""
    index = RegistryIndex(rpc_url, deployment, db_url)
    return RegistryPeerDirectory(index.nodes, refresh_interval_s=refresh_interval_s, on_close=index.close)


class RegistryDirectorySource:
    """The node's registry view as a :class:`Directory` (relays and model nodes), what its re-forwarding chooses
    peers and paths from (§10.5): read through a :class:`RegistryIndex` in a worker thread, at most every
    ``refresh_s`` (the previous view is served in between, and kept when a read fails). Awaiting it returns the
    view; :meth:`close` closes the index (the node does on every path out of ``ps-node serve``)."""

    def __init__(self, rpc_url: str, deployment: Path | None, db_url: str, *, refresh_s: float = 15.0) -> None:
        self._index = RegistryIndex(rpc_url, deployment, db_url)
        self._refresh_s = refresh_s
        self._cached: Directory | None = None
        self._read_at = -float("inf")
        #: The read under way: one at a time, shared by every caller. A caller that gives up (the re-forwarder waits
        #: 5 s) leaves it running for the next one; a fresh read per caller would pile up worker threads (and syncs
        #: of one index) while the chain is slow, starving the node's other worker-thread work.
        self._pending: asyncio.Future[Directory] | None = None

    def _read(self) -> Directory:
        return Directory.from_registry(self._index.nodes())

    def _settled(self, job: asyncio.Future[Directory]) -> None:
        self._pending = None
        self._read_at = time.monotonic()  # also after a failure: a dead chain must not slow every decision
        if not job.cancelled() and job.exception() is None:
            self._cached = job.result()
        elif self._cached is not None:
            log.warning("registry view for re-forwarding not refreshed; keeping the last one")

    async def __call__(self) -> Directory:
        cached = self._cached
        if cached is not None and time.monotonic() - self._read_at < self._refresh_s:
            return cached
        if self._pending is None:
            self._pending = asyncio.ensure_future(asyncio.to_thread(self._read))
            self._pending.add_done_callback(self._settled)
        job = self._pending
        try:
            return await asyncio.shield(job)
        except Exception:  # a chain or database error: keep the last view (none yet: raise to the caller)
            if self._cached is None:
                raise
            return self._cached

    def close(self) -> None:
        """Close the registry index (idempotent; a read under way closes it when it ends)."""
        self._index.close()


def registry_directory_source(
    rpc_url: str, deployment: Path | None, db_url: str, *, refresh_s: float = 15.0
) -> RegistryDirectorySource:
    """A :class:`RegistryDirectorySource` (what ``ps-node serve`` re-forwards with); close it when done."""
    return RegistryDirectorySource(rpc_url, deployment, db_url, refresh_s=refresh_s)


def _shared_health(check: Callable[[], Awaitable[bool]]) -> Callable[[], Awaitable[bool]]:
    """``check`` run at most once at a time: callers that come while it runs share its answer (a failure counts as
    not healthy).

    Why: readiness (``GET /overlay/readyz``) is public, and some engines' check is a request to another server (the
    openai-http engine asks its upstream's ``/v1/models``, up to 5 s): without this, every stranger's concurrent GET
    would become one more request upstream. A check that starts after one ended runs afresh, so readiness turns
    false as soon as the engine is closed.
    """
    pending: asyncio.Future[bool] | None = None

    def settled(job: asyncio.Future[bool]) -> None:
        nonlocal pending
        pending = None
        if not job.cancelled():
            job.exception()  # retrieved here: a failure is "not healthy", never an unretrieved-exception warning

    async def health() -> bool:
        nonlocal pending
        if pending is None:
            pending = asyncio.ensure_future(check())
            pending.add_done_callback(settled)
        job = pending
        try:
            return await asyncio.shield(job)
        except Exception:  # the engine's check failed: not ready
            return False

    return health


def create_model_app(
    config: OverlayConfig,
    engine: Engine,
    *,
    peers: PeerDirectory | None = None,
    heartbeat: HeartbeatPublisher | None = None,
    observers: Sequence[RequestObserver] = (),
    payments: Payments | None = None,
    reforward: Reforwarder | None = None,
) -> web.Application:
    """A model node: the overlay serving completions from ``engine``, which it closes on shutdown.

    With ``payments`` it serves only paid requests (protocol §10.4); without, it serves for free.

    With ``heartbeat``, the node serves its signed heartbeat at ``GET /overlay/v1/heartbeat`` and feeds it the TTFT
    and prefix counts of every request it serves.

    With ``reforward``, a request accepted while the engine is over its queue bound may be served by a peer
    (protocol §10.5); ``planetserve_reforwards_total{outcome}`` at ``/metrics`` counts the decisions.
    """

    async def engine_ctx(_app: web.Application) -> AsyncIterator[None]:
        yield
        await engine.close()

    # The handler iterates this list per request: the node's metrics, created with the app, join it below.
    watchers: list[RequestObserver] = [*observers, *([heartbeat] if heartbeat is not None else [])]
    routes = []
    if heartbeat is not None:
        routes.append(web.get(HEARTBEAT_PATH.removeprefix("/overlay"), heartbeat_route(heartbeat)))
    handler = completion_handler(engine, observers=watchers, payments=payments, reforward=reforward)
    app = create_app(config, handler, peers=peers, routes=routes)
    metrics = app[keys.NODE_METRICS]
    metrics.watch_engine(engine.stats)
    watchers.append(metrics)
    if reforward is not None:
        from node.overlay._reforward import ReforwardCollector

        metrics.registry.register(ReforwardCollector(reforward))
        app.cleanup_ctx.append(reforward.cleanup_ctx())
    if isinstance(peers, RegistryPeerDirectory):
        app.cleanup_ctx.append(peers.cleanup_ctx())
    app[keys.OVERLAY_APP][keys.ENGINE_HEALTH] = _shared_health(engine.check_health)
    app.cleanup_ctx.append(engine_ctx)
    return app


async def serve_until(
    app: web.Application,
    *,
    host: str,
    port: int,
    stop: asyncio.Event,
    on_ready: Callable[[str], None],
    shutdown_grace_s: float = SHUTDOWN_GRACE_S,
) -> None:
    """Listen on ``host:port`` (0 picks a free port), call ``on_ready(endpoint)``, and serve until ``stop`` is set."""
    runner = web.AppRunner(app, shutdown_timeout=shutdown_grace_s, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        endpoint = f"http://{bound_host}:{bound_port}"
        log.info("serving on %s", endpoint)
        on_ready(endpoint)
        await stop.wait()
    finally:
        await runner.cleanup()
