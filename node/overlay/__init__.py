"""The aiohttp overlay: relay and model-node roles, and the client that sends requests over onion paths.

``create_app(config, handler=None)`` builds a node's application; ``send_request`` is the client side.

A model node plugs its engine in as the reply handler, which receives the rebuilt application request and yields reply
bytes as they are produced (each piece travels back as one or more sealed chunks, on every live path)::

    async def serve(request: bytes) -> AsyncIterator[bytes]:
        ...  # parse the request, check the voucher, then stream the engine's output
        yield b"token text"

    app = create_app(OverlayConfig(x25519_secret=secret, role="model"), serve)
    web.run_app(app, host="0.0.0.0", port=8700)

A relay is ``create_app(OverlayConfig(x25519_secret=secret))``.
"""

from node.overlay._app import create_app
from node.overlay._client import ClientSettings, send_request
from node.overlay._completion import (
    CompletionDelta,
    CompletionError,
    CompletionRequest,
    complete,
    complete_routed,
    completion_handler,
)
from node.overlay._config import OverlayConfig
from node.overlay._directory import Directory, ModelNode, NoModelNode, Route
from node.overlay._errors import DestinationFailed, OverlayError, ReplyIncomplete, SessionClosed
from node.overlay._receiver import CloveReceiver, ReplyHandler

__all__ = [
    "ClientSettings",
    "CloveReceiver",
    "CompletionDelta",
    "CompletionError",
    "CompletionRequest",
    "DestinationFailed",
    "Directory",
    "ModelNode",
    "NoModelNode",
    "OverlayConfig",
    "OverlayError",
    "ReplyHandler",
    "ReplyIncomplete",
    "Route",
    "SessionClosed",
    "complete",
    "complete_routed",
    "completion_handler",
    "create_app",
    "send_request",
]
