"""The overlay's errors: one base with an HTTP status, and how privacy rejects map onto statuses."""

from __future__ import annotations

from node._errors import PlanetServeError
from node.privacy import RejectReason


class OverlayError(PlanetServeError):
    """Base of every error raised by ``node.overlay``; ``status`` is the HTTP status it renders as."""

    code = "network_overlay_error"
    status = 500


class ReplyIncomplete(OverlayError):
    """Every path failed before the destination's final reply chunk arrived."""

    code = "network_reply_incomplete"
    status = 502

    def __init__(self, paths: int, received: int) -> None:
        self.paths = paths
        self.received = received
        super().__init__(f"all {paths} paths failed after {received} reply chunks")


class DestinationFailed(OverlayError):
    """The destination reported that serving the request failed (an ERROR reply chunk)."""

    code = "network_destination_failed"
    status = 502


#: HTTP status of each reject reason (``docs/protocol.md`` §7).
REJECT_STATUS: dict[RejectReason, int] = {
    RejectReason.REPLAY: 409,
    RejectReason.EXPIRED: 410,
    RejectReason.OVERSIZED: 413,
    RejectReason.OVERLOADED: 503,
    RejectReason.UPSTREAM_FAILED: 502,
    RejectReason.UPSTREAM_TIMEOUT: 504,
}


def status_for(reason: RejectReason) -> int:
    """The HTTP status a rejected packet gets (400 unless listed in ``REJECT_STATUS``)."""
    return REJECT_STATUS.get(reason, 400)
