"""The aiohttp overlay: relay and model-node roles, and the client that sends requests over onion paths.

``create_app(config, handler=None)`` builds a node's application; ``send_request`` is the client side.
"""

from node.overlay._app import create_app
from node.overlay._client import ClientSettings, send_request
from node.overlay._config import OverlayConfig
from node.overlay._errors import DestinationFailed, OverlayError, ReplyIncomplete
from node.overlay._receiver import CloveReceiver, ReplyHandler

__all__ = [
    "ClientSettings",
    "CloveReceiver",
    "DestinationFailed",
    "OverlayConfig",
    "OverlayError",
    "ReplyHandler",
    "ReplyIncomplete",
    "create_app",
    "send_request",
]
