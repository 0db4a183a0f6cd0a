"""A bounded, expiring replay cache keyed by the per-hop replay tag (``docs/protocol.md`` §5.6)."""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable

from node.privacy._constants import EXPIRY_GRANULARITY
from node.privacy._errors import InvalidPrivacyParam, MalformedPacket, RejectReason


class ReplayCache:
    """Remembers each packet's replay tag until the packet's expiry.

    Bounded by ``capacity``; when full of unexpired tags it fails closed (``OVERLOADED``) instead of forgetting a tag,
    because forgetting one would let that packet be replayed. Not thread-safe: one event loop owns it.
    """

    __slots__ = ("_capacity", "_clock", "_heap", "_tags")

    def __init__(self, capacity: int = 200_000, clock: Callable[[], float] = time.time) -> None:
        if capacity < 1:
            raise InvalidPrivacyParam("capacity", capacity, "at least 1")
        self._capacity = capacity
        self._clock = clock
        self._tags: dict[bytes, int] = {}
        self._heap: list[tuple[int, bytes]] = []

    def __len__(self) -> int:
        return len(self._tags)

    def _purge(self) -> None:
        # Keep a tag one granularity past its expiry, matching the hops' clock tolerance.
        horizon = self._clock() - EXPIRY_GRANULARITY
        while self._heap and self._heap[0][0] < horizon:
            _, tag = heapq.heappop(self._heap)
            self._tags.pop(tag, None)

    def check_and_add(self, tag: bytes, expiry: int) -> None:
        """Record ``tag``; raise ``MalformedPacket(REPLAY)`` if it was seen, ``OVERLOADED`` if the cache is full."""
        self._purge()
        if tag in self._tags:
            raise MalformedPacket(RejectReason.REPLAY)
        if len(self._tags) >= self._capacity:
            raise MalformedPacket(RejectReason.OVERLOADED, "replay cache full")
        self._tags[tag] = expiry
        heapq.heappush(self._heap, (expiry, tag))
