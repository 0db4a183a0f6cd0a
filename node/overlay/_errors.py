"""The overlay's errors: one base with an HTTP status, and how privacy rejects map onto statuses."""

from __future__ import annotations

from node._errors import PlanetServeError
from node.privacy import RejectReason


class OverlayError(PlanetServeError):
    """Base of every error raised by ``node.overlay``; ``status`` is the HTTP status it renders as."""

    code = "network_overlay_error"
    status = 500


class ReplyIncomplete(OverlayError):
    """The paths failed before the destination's final reply chunk arrived.

    Indexes of paths: ``failed_early`` ended before their first hop answered 200 (their clove probably never reached
    the destination: a dead or refusing relay on them), ``first_hop_failed`` (a subset) failed at their first hop
    itself (no answer, or a refusal of its own rather than an ``upstream_*`` error), and ``started`` had their reply
    begin. With ``received == 0`` and nothing ``started`` the destination never rebuilt the request, so a client may
    retry it over paths that avoid the suspects.
    """

    code = "network_reply_incomplete"
    status = 502

    def __init__(
        self,
        paths: int,
        received: int,
        failed_early: tuple[int, ...] = (),
        started: tuple[int, ...] = (),
        first_hop_failed: tuple[int, ...] = (),
    ) -> None:
        self.paths = paths
        self.received = received
        self.failed_early = failed_early
        self.started = started
        self.first_hop_failed = first_hop_failed
        super().__init__(
            f"{len(failed_early) + len(started)} of {paths} paths failed ({len(failed_early)} before any reply)"
            f" after {received} reply chunks"
        )


class DestinationFailed(OverlayError):
    """The destination reported that serving the request failed (an ERROR reply chunk)."""

    code = "network_destination_failed"
    status = 502


class SessionClosed(OverlayError):
    """A component's HTTP connections were closed (it is shutting down) and it was asked to open one again.

    Opening a fresh session then would leak it: nothing would close it any more (an unclosed session is only
    reported when the garbage collector finds it, in whatever code runs at that moment)."""

    code = "network_session_closed"
    status = 503

    def __init__(self, owner: str) -> None:
        self.owner = owner
        super().__init__(f"the {owner} is closed; it opens no new connections")


#: HTTP status of each reject reason (``docs/protocol.md`` §7).
REJECT_STATUS: dict[RejectReason, int] = {
    RejectReason.SLOW_BODY: 408,
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
