"""``create_app(config)``: the aiohttp application of an overlay node (relay or model-node side).

Routes live on the ``/overlay`` sub-app:

- ``POST /overlay/v1/onion``: one onion packet in, a reply frame stream out (``docs/protocol.md`` §7);
- ``GET /overlay/healthz`` (liveness) and ``GET /overlay/readyz`` (readiness: fails while draining);
- ``GET /overlay/metrics``: request counters and every reject reason's count, as JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Protocol, runtime_checkable

import aiohttp
from aiohttp import web

from node._errors import PlanetServeError
from node.overlay import keys
from node.overlay._config import OverlayConfig
from node.overlay._dialing import public_only_socket
from node.overlay._errors import OverlayError, status_for
from node.overlay._metrics import OverlayMetrics
from node.overlay._peers import PeerDirectory, StaticPeerDirectory
from node.overlay._prometheus import NodeMetrics, metrics_route
from node.overlay._receiver import CloveReceiver, ReplyHandler
from node.overlay._relay import RelayState, forward
from node.privacy import (
    MalformedPacket,
    OnionKey,
    PeeledExit,
    RejectReason,
    ReplayCache,
    ReplayJournal,
    keyring,
    peel,
)
from node.privacy._constants import MAX_PACKET

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Seconds between sweeps of expired model-side messages.
_SWEEP_INTERVAL_S = 1.0
#: aiohttp's header limits, set explicitly: peers send only a few short headers.
_MAX_LINE_SIZE = 8190
_MAX_FIELD_SIZE = 8190


def _error_response(status: int, code: str, message: str, error_type: str = "invalid_request_error") -> web.Response:
    """The OpenAI-shaped error body (``message``, ``type``, ``param``, ``code``)."""
    body = {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    return web.json_response(body, status=status)


def _reject(app: web.Application, reason: RejectReason, message: str) -> web.Response:
    """Count, log (the reason only, never payload bytes) and render one rejected request."""
    app[keys.METRICS].reject(reason)
    log.info("rejected: %s", reason.value)
    return _error_response(status_for(reason), reason.value, message)


@web.middleware
async def limits_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """First: refuse work we must not start (draining, too many in flight, a body over the limit).

    Only packets (POST) take an in-flight slot: the GET routes (health, info, metrics, heartbeat) answer at once
    from memory, and a flood of them must not make this node refuse packets as overloaded.
    """
    app = request.app
    state = app[keys.RELAY_STATE]
    if request.method != "POST":
        return await handler(request)
    if state.draining or state.inflight >= app[keys.CONFIG].max_inflight:
        return _reject(app, RejectReason.OVERLOADED, "node is draining or at its in-flight limit")
    if request.content_length is not None and request.content_length > app[keys.CONFIG].max_body:
        return _reject(app, RejectReason.OVERSIZED, "request body over the limit")
    state.inflight += 1
    try:
        return await handler(request)
    finally:
        state.inflight -= 1


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Second: render domain errors in the OpenAI error shape and count every reject reason."""
    try:
        return await handler(request)
    except MalformedPacket as exc:
        return _reject(request.app, exc.reason, f"rejected: {exc.reason.value}")
    except OverlayError as exc:
        return _error_response(exc.status, exc.code, str(exc), "server_error")
    except PlanetServeError as exc:
        return _error_response(400, exc.code, str(exc))
    except web.HTTPRequestEntityTooLarge:
        return _reject(request.app, RejectReason.OVERSIZED, "request body over the limit")


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Third: a random request id for logs, and request counting and timing."""
    request_id = secrets.token_hex(8)
    request[keys.REQUEST_ID] = request_id
    request.app[keys.METRICS].requests += 1
    started = time.perf_counter()
    try:
        return await handler(request)
    finally:
        log.debug("request %s %s took %.1f ms", request_id, request.path, (time.perf_counter() - started) * 1e3)


async def onion_handler(request: web.Request) -> web.StreamResponse:
    """Parse one packet, peel it, drop replays, then forward it or deliver its clove."""
    app = request.app
    config = app[keys.CONFIG]
    try:
        async with asyncio.timeout(config.body_timeout_s):
            packet = await request.read()
    except TimeoutError as exc:
        raise MalformedPacket(RejectReason.SLOW_BODY, "the packet did not arrive in time") from exc
    if len(packet) > MAX_PACKET:
        raise MalformedPacket(RejectReason.OVERSIZED)
    replay = app[keys.RELAY_STATE].replay
    # §5.4: the replay lookup happens inside peel (after the header MAC, before the slot); the tag is recorded only
    # once every check passed, so junk never takes a cache entry.
    peeled = peel(packet, app[keys.ONION_KEYRING], seen=replay.seen)
    replay.check_and_add(peeled.keys.replay_tag, peeled.expiry)
    if isinstance(peeled, PeeledExit):
        receiver = app.get(keys.RECEIVER)
        if receiver is None:
            raise MalformedPacket(RejectReason.NOT_EXIT, "this node is a relay only")
        return await receiver.deliver(request, peeled.clove, peeled.keys.reply)
    return await forward(request, peeled, app[keys.CLIENT_SESSION], config, app[keys.METRICS], app[keys.PEERS])


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.json_response({"status": "ok"})


async def node_info(request: web.Request) -> web.Response:
    """The node's role and the onion public keys it accepts packets for (public data: the registry publishes them).

    ``ps-node register`` reads it to check that the endpoint it is about to publish runs the node whose key it
    registers; a mismatch would otherwise show up only later, as relays a client cannot reach.
    """
    app = request.app
    ring = app[keys.ONION_KEYRING]
    public = ["0x" + key.public.hex() for key in ring.values()]
    return web.json_response({"role": app[keys.CONFIG].role, "x25519_public_keys": public})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: not draining (and, on a model node, the receiver is in place and the engine healthy)."""
    app = request.app
    ready = not app[keys.RELAY_STATE].draining and (app[keys.CONFIG].role == "relay" or keys.RECEIVER in app)
    health = app.get(keys.ENGINE_HEALTH)
    if ready and health is not None:
        ready = await health()
    return web.json_response({"ready": ready}, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    """Counters, including every reject reason (zero ones too)."""
    app = request.app
    snapshot = app[keys.METRICS].snapshot()
    snapshot["replay_cache_entries"] = len(app[keys.RELAY_STATE].replay)
    receiver = app.get(keys.RECEIVER)
    snapshot["messages_in_flight"] = len(receiver) if receiver is not None else 0
    return web.json_response(snapshot)


def _client_session_ctx(overlay: web.Application) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(_root: web.Application) -> AsyncIterator[None]:
        config = overlay[keys.CONFIG]
        # Idle upstream connections are dropped before half our header timeout: peers run the same limit, so they
        # never close a pooled connection just as this node reuses it (which would fail a request for nothing).
        keepalive = min(15.0, config.header_timeout_s / 2)
        connector = aiohttp.TCPConnector(
            limit=config.max_inflight,
            ttl_dns_cache=60,
            keepalive_timeout=keepalive,
            socket_factory=None if config.dial_private_addresses else public_only_socket,
        )
        session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        overlay[keys.CLIENT_SESSION] = session
        yield
        await session.close()

    return ctx


def _receiver_ctx(overlay: web.Application) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(_root: web.Application) -> AsyncIterator[None]:
        receiver = overlay.get(keys.RECEIVER)
        if receiver is None:
            yield
            return

        async def sweeper() -> None:
            while True:
                await asyncio.sleep(_SWEEP_INTERVAL_S)
                receiver.sweep()

        task = asyncio.get_running_loop().create_task(sweeper())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await receiver.close()

    return ctx


@runtime_checkable
class _Reloadable(Protocol):
    def reload(self) -> None: ...


def _keyring_ctx(overlay: web.Application) -> Callable[[web.Application], AsyncIterator[None]]:
    """Reload a rotating keyring every ``keyring_reload_s`` (a rotation then needs no restart; see node._identity)."""

    async def ctx(_root: web.Application) -> AsyncIterator[None]:
        ring = overlay[keys.ONION_KEYRING]
        if not isinstance(ring, _Reloadable):
            yield
            return
        reloadable: _Reloadable = ring

        async def reloader() -> None:
            while True:
                await asyncio.sleep(overlay[keys.CONFIG].keyring_reload_s)
                try:
                    reloadable.reload()
                except (PlanetServeError, OSError) as exc:  # keep serving with the keys already loaded
                    log.warning("onion keyring reload failed: %s", type(exc).__name__)

        task = asyncio.get_running_loop().create_task(reloader())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return ctx


def _draining_ctx(overlay: web.Application) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(_root: web.Application) -> AsyncIterator[None]:
        yield
        overlay[keys.RELAY_STATE].draining = True
        overlay[keys.RELAY_STATE].replay.close()

    return ctx


def create_overlay_app(
    config: OverlayConfig, handler: ReplyHandler | None = None, *, peers: PeerDirectory | None = None
) -> web.Application:
    """The ``/overlay`` sub-application alone (mount it with ``add_subapp``). Without ``peers`` the node knows no
    other node and forwards nothing."""
    if config.role == "model" and handler is None:
        raise OverlayError("a model node needs a reply handler")
    # Middleware order is fixed: limits, then error mapping, then request id and metrics.
    overlay = web.Application(
        client_max_size=config.max_body,
        middlewares=[limits_middleware, error_middleware, request_id_middleware],
    )
    overlay[keys.CONFIG] = config
    overlay[keys.RELAY_STATE_PUBLIC] = config.x25519_public
    overlay[keys.ONION_KEYRING] = (
        config.onion_keyring if config.onion_keyring is not None else keyring(OnionKey(config.x25519_secret))
    )
    overlay[keys.PEERS] = peers if peers is not None else StaticPeerDirectory()
    metrics_ = OverlayMetrics()
    overlay[keys.METRICS] = metrics_
    journal = ReplayJournal(config.replay_journal) if config.replay_journal is not None else None
    overlay[keys.RELAY_STATE] = RelayState(replay=ReplayCache(capacity=config.replay_capacity, journal=journal))
    if handler is not None:
        overlay[keys.RECEIVER] = CloveReceiver(handler, config, metrics_)
    overlay.router.add_post("/v1/onion", onion_handler)
    overlay.router.add_get("/healthz", healthz)
    overlay.router.add_get("/readyz", readyz)
    overlay.router.add_get("/info", node_info)
    overlay.router.add_get("/metrics", metrics)
    return overlay


def create_app(
    config: OverlayConfig,
    handler: ReplyHandler | None = None,
    *,
    peers: PeerDirectory | None = None,
    routes: Sequence[web.RouteDef] = (),
) -> web.Application:
    """The whole application of an overlay node: a root app with the ``/overlay`` sub-app mounted.

    A relay needs ``config`` and ``peers``, its view of the registry (the only nodes it forwards to); a model node
    also passes the ``handler`` that serves rebuilt requests, and ``routes`` it adds under ``/overlay`` (its
    heartbeat).
    """
    overlay = create_overlay_app(config, handler, peers=peers)
    overlay.router.add_routes(routes)
    root = web.Application(
        client_max_size=config.max_body,
        handler_args={
            "max_line_size": _MAX_LINE_SIZE,
            "max_field_size": _MAX_FIELD_SIZE,
            # aiohttp closes a connection that has not sent a whole request head this long after connecting (or
            # after its last response): the header-read timeout, which also ends idle kept-alive connections.
            "keepalive_timeout": config.header_timeout_s,
        },
    )
    # One cleanup context per long-lived resource; they run on the root app, which owns the event loop's lifetime.
    root.cleanup_ctx.append(_client_session_ctx(overlay))
    root.cleanup_ctx.append(_receiver_ctx(overlay))
    root.cleanup_ctx.append(_keyring_ctx(overlay))
    root.cleanup_ctx.append(_draining_ctx(overlay))
    root.add_subapp("/overlay", overlay)
    root[keys.OVERLAY_APP] = overlay
    # Prometheus at /metrics (the convention), on the root app; its registry belongs to this app alone.
    node_metrics = NodeMetrics(overlay[keys.METRICS], role=config.role)
    root[keys.NODE_METRICS] = node_metrics
    root.router.add_routes([metrics_route(node_metrics)])
    return root
