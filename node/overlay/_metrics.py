"""Counters an overlay node exposes at ``GET /overlay/metrics``. Labels are reject reasons only: no payload data."""

from __future__ import annotations

from dataclasses import dataclass, field

from node.privacy import RejectReason


@dataclass(slots=True)
class OverlayMetrics:
    """Mutable counters owned by one application (one event loop)."""

    requests: int = 0
    forwarded: int = 0
    delivered: int = 0
    streams_completed: int = 0
    streams_aborted: int = 0
    messages_served: int = 0
    rejected: dict[RejectReason, int] = field(default_factory=lambda: dict.fromkeys(RejectReason, 0))

    def reject(self, reason: RejectReason) -> None:
        """Count one rejected packet."""
        self.rejected[reason] += 1

    @property
    def rejected_total(self) -> int:
        """All rejected packets."""
        return sum(self.rejected.values())

    def snapshot(self) -> dict[str, object]:
        """A JSON-ready copy."""
        return {
            "requests": self.requests,
            "forwarded": self.forwarded,
            "delivered": self.delivered,
            "streams_completed": self.streams_completed,
            "streams_aborted": self.streams_aborted,
            "messages_served": self.messages_served,
            "rejected_total": self.rejected_total,
            "rejected": {reason.value: count for reason, count in self.rejected.items()},
        }
