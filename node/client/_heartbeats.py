"""The client's view of model nodes' heartbeats: fetched, verified against the registry, dropped when silent.

A heartbeat counts only if it is signed by the operator the registry names for that node, is fresh, and is newer
than the last one seen (``HeartbeatCheck``). A node that fails to answer ``max_failures`` fetches in a row, or whose
last good heartbeat is older than ``max_age_s``, is *silent*: the forwarding policy does not route to it while any
node that answers serves the model.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from pydantic import ValidationError

from node.client._policy import LoadReport
from node.overlay import ModelNode
from node.overlay._heartbeat import MAX_HEARTBEAT_BYTES, Heartbeat, HeartbeatCheck, HeartbeatRejected, SignedHeartbeat

log = logging.getLogger(__name__)

#: Fetches the raw heartbeat body of the node at an endpoint (bounded in size and time by the implementation).
HeartbeatFetch = Callable[[str], Awaitable[bytes]]


def load_report(beat: Heartbeat) -> LoadReport:
    """The load figures of a verified heartbeat, as the policy's :class:`LoadReport` (a version-1 heartbeat has no
    decode backlog, a version-2 one no prefill speed: those fields read 0, unknown)."""
    return LoadReport(
        issued_at=beat.issued_at_ms / 1000.0,
        queued_tokens=beat.queued_tokens,
        requests=beat.queued_requests + beat.running_requests,
        decode_backlog_tokens=beat.decode_backlog_tokens,
        seconds_per_decode_token=beat.decode_ms_per_token / 1000.0,
        batch=beat.running_requests,
        seconds_per_prefill_token=beat.prefill_ms_per_token / 1000.0,
    )


@dataclass(slots=True)
class _Entry:
    check: HeartbeatCheck
    latest: Heartbeat | None = None
    received_at: float = 0.0
    failures: int = 0


@dataclass(slots=True, kw_only=True)
class HeartbeatMonitor:
    """Latest verified heartbeat per model node."""

    fetch: HeartbeatFetch
    """How a heartbeat is fetched (the transport's ``fetch_heartbeat``)."""
    max_age_s: float = 5.0
    """A heartbeat older than this no longer counts, seconds."""
    timeout_s: float = 1.0
    """Per fetch, seconds."""
    max_failures: int = 2
    """Failed fetches in a row after which a node is silent."""
    _entries: dict[str, _Entry] = field(default_factory=dict)
    rejected: int = 0
    """Heartbeats that failed a check (forged, stale, replayed, malformed)."""

    def _entry(self, node: ModelNode) -> _Entry:
        entry = self._entries.get(node.operator)
        if entry is None or entry.check.model_id != node.model_id:
            entry = _Entry(HeartbeatCheck(operator=node.operator, model_id=node.model_id, max_age_s=self.max_age_s))
            self._entries[node.operator] = entry
        return entry

    async def _one(self, node: ModelNode) -> None:
        entry = self._entry(node)
        try:
            async with asyncio.timeout(self.timeout_s):
                raw = await self.fetch(node.endpoint)
            if len(raw) > MAX_HEARTBEAT_BYTES:
                raise HeartbeatRejected("too large")
            signed = SignedHeartbeat.model_validate_json(raw)
            if entry.latest is not None and signed.heartbeat == entry.latest:
                # The node has not issued a new one since (it re-issues at most every interval): it still answers.
                # Its age is judged by ``issued_at`` in ``latest``; an *older* heartbeat replayed is still rejected.
                entry.failures = 0
                return
            entry.latest = entry.check.accept(signed)
            entry.received_at = time.time()
            entry.failures = 0
        except (HeartbeatRejected, ValidationError) as exc:
            self.rejected += 1
            entry.failures += 1
            log.info("heartbeat of %s rejected: %s", node.operator, getattr(exc, "reason", "malformed"))
        except (TimeoutError, OSError, ValueError) as exc:
            entry.failures += 1
            log.info("heartbeat of %s not fetched: %s", node.operator, type(exc).__name__)

    async def refresh(self, nodes: Sequence[ModelNode]) -> None:
        """Fetch every node's heartbeat concurrently (each bounded by ``timeout_s``)."""
        await asyncio.gather(*(self._one(n) for n in nodes))

    def latest(self, operator: str, *, now: float | None = None) -> Heartbeat | None:
        """The node's last verified heartbeat if still fresh and the node still answers, else None."""
        entry = self._entries.get(operator)
        if entry is None or entry.latest is None or entry.failures >= self.max_failures:
            return None
        now = time.time() if now is None else now
        if now - entry.latest.issued_at_ms / 1000 > self.max_age_s:
            return None
        return entry.latest

    def silent(self, operator: str) -> bool:
        """Whether the node has no usable heartbeat now."""
        return self.latest(operator) is None
