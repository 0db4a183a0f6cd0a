"""The client layer's errors: one base, and how every error a request can meet renders in OpenAI's shape."""

from __future__ import annotations

from dataclasses import dataclass

from node._errors import PlanetServeError
from node.inference import EngineOverloaded, InvalidParams
from node.overlay import CompletionError, NoModelNode, OverlayError, ReplyIncomplete
from node.privacy import InsufficientRelays


class ClientError(PlanetServeError):
    """Base of every error raised by ``node.client``."""

    code = "network_client_error"


class UnknownModel(ClientError):
    """The requested model is not one this client can route to (not registered, or no known name)."""

    code = "invalid_model"

    def __init__(self, model: str, reason: str = "not registered on chain or served by no routable node") -> None:
        self.model = model
        super().__init__(f"unknown model {model[:80]!r}: {reason}")


class RequestTimeout(ClientError):
    """The request did not finish within the client's deadline."""

    code = "network_request_timeout"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        super().__init__(f"the request did not finish within {seconds:g} s")


@dataclass(frozen=True, slots=True)
class Rendered:
    """How an error is shown to an OpenAI-compatible caller."""

    status: int
    """HTTP status."""
    error_type: str
    """OpenAI ``type``."""
    code: str
    """Stable ``code``."""
    param: str | None
    """The request field at fault, if any."""


def render(exc: BaseException) -> Rendered:
    """Map an error to its HTTP status and OpenAI type, by class (never by a peer's string)."""
    if isinstance(exc, InvalidParams):
        return Rendered(400, "invalid_request_error", exc.code, exc.param)
    if isinstance(exc, UnknownModel):
        return Rendered(404, "invalid_request_error", "model_not_found", "model")
    if isinstance(exc, RequestTimeout):
        return Rendered(504, "server_error", exc.code, None)
    if isinstance(exc, EngineOverloaded):
        return Rendered(503, "server_error", "overloaded", None)
    if isinstance(exc, CompletionError):
        # The model node's code is shown (it is data), but our status depends only on our own classification.
        status = 400 if exc.code in {"invalid_request", "invalid_params"} else 502
        if exc.code == "overloaded":
            status = 503
        return Rendered(status, "invalid_request_error" if status == 400 else "server_error", exc.code, exc.param)
    if isinstance(exc, NoModelNode | InsufficientRelays):
        return Rendered(503, "server_error", "network_unavailable", None)
    if isinstance(exc, ReplyIncomplete | OverlayError):
        return Rendered(502, "server_error", exc.code, None)
    if isinstance(exc, PlanetServeError):
        return Rendered(500, "server_error", exc.code, None)
    return Rendered(500, "server_error", "internal_error", None)
