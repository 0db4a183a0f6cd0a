"""Typed keys for the state an overlay application holds. No module-level state exists anywhere else."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from node.overlay._config import OverlayConfig
from node.overlay._metrics import OverlayMetrics
from node.overlay._peers import PeerDirectory
from node.overlay._prometheus import NodeMetrics
from node.overlay._receiver import CloveReceiver
from node.overlay._relay import RelayState
from node.privacy import OnionKeyring

#: The node's configuration.
CONFIG = web.AppKey("planetserve.overlay.config", OverlayConfig)
#: Counters served at ``/overlay/metrics``.
METRICS = web.AppKey("planetserve.overlay.metrics", OverlayMetrics)
#: Replay cache, in-flight bound and draining flag.
RELAY_STATE = web.AppKey("planetserve.overlay.relay_state", RelayState)
#: The HTTP client used to reach next hops (one per application, closed on cleanup).
CLIENT_SESSION = web.AppKey("planetserve.overlay.client_session", aiohttp.ClientSession)
#: The model-node side (``None`` on a pure relay).
RECEIVER = web.AppKey("planetserve.overlay.receiver", CloveReceiver)
#: Per request: a random id for logs (no client data in it).
REQUEST_ID = web.RequestKey("planetserve.overlay.request_id", str)
#: The node's raw X25519 public key (derived once from the secret).
RELAY_STATE_PUBLIC = web.AppKey("planetserve.overlay.public_key", bytes)
#: The node's onion keys by key id (one key, or the current and previous ones during a rotation): what ``peel``
#: looks the packet's key id up in. Replace the mapping to rotate; never mutate it while a request may read it.
ONION_KEYRING: web.AppKey[OnionKeyring] = web.AppKey("planetserve.overlay.onion_keyring")
#: The node's own view of the registry: the only nodes it sends packets to (``docs/protocol.md`` §5.4 step 8).
PEERS: web.AppKey[PeerDirectory] = web.AppKey("planetserve.overlay.peers")
#: On the root application: the ``/overlay`` sub-application (for tests and tools that inspect its state).
OVERLAY_APP = web.AppKey("planetserve.overlay.app", web.Application)
#: On the root application: the node's Prometheus registry (``GET /metrics``).
NODE_METRICS = web.AppKey("planetserve.overlay.node_metrics", NodeMetrics)
#: Model nodes: the engine's health check; readiness fails while it answers False.
ENGINE_HEALTH: web.AppKey[Callable[[], Awaitable[bool]]] = web.AppKey("planetserve.overlay.engine_health")
