"""A bounded, expiring replay cache keyed by the per-hop replay tag (``docs/protocol.md`` §5.6), with an optional
journal so that a restarted node still refuses the packets it accepted before the restart."""

from __future__ import annotations

import heapq
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Final

from node.privacy._constants import EXPIRY_GRANULARITY, REPLAY_TAG_LEN
from node.privacy._errors import InvalidPrivacyParam, MalformedPacket, RejectReason, ReplayJournalError

_MAGIC: Final = b"PSRPLY01"
_RECORD: Final = struct.Struct(f">I{REPLAY_TAG_LEN}s")


class ReplayJournal:
    """An append-only file of ``expiry u32 || tag`` records behind a magic header.

    Why: the replay cache lives in memory, and a relay that restarts would otherwise forward again, for up to
    ``MAX_TTL`` seconds, every packet an observer recorded before the restart, a classic way to trace a packet through
    a mix network. Each record is flushed to the operating system as it is written, so a crashed process loses
    nothing; a power loss can lose the last records (``close`` also fsyncs). A record cut short by a crash is ignored.
    """

    __slots__ = ("_file", "_path")

    def __init__(self, path: Path) -> None:
        self._path = path
        self._file: BinaryIO | None = None

    @property
    def path(self) -> Path:
        """Where the journal lives."""
        return self._path

    def load(self, now: float) -> list[tuple[int, bytes]]:
        """The records whose expiry is not yet past (by one granularity), in file order; none for a missing file."""
        try:
            data = self._path.read_bytes()
        except FileNotFoundError:
            return []
        if not data.startswith(_MAGIC):
            raise ReplayJournalError(f"{self._path} is not a replay journal")
        body = memoryview(data)[len(_MAGIC) :]
        whole = len(body) - len(body) % _RECORD.size
        horizon = now - EXPIRY_GRANULARITY
        return [(expiry, tag) for expiry, tag in _RECORD.iter_unpack(body[:whole]) if expiry >= horizon]

    def rewrite(self, entries: list[tuple[int, bytes]]) -> None:
        """Replace the file with ``entries`` (atomically: a crash leaves the old file or the new one), then append."""
        self.close()
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_name(self._path.name + ".tmp")
        # Owner-only, like the node's key beside it: the tags are not secret, but their expiries trace traffic.
        tmp.unlink(missing_ok=True)  # a leftover from a crash keeps its old mode otherwise
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
            out.write(_MAGIC + b"".join(_RECORD.pack(expiry, tag) for expiry, tag in entries))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self._path)
        self._file = self._path.open("ab")

    def append(self, tag: bytes, expiry: int) -> None:
        """Record one accepted packet."""
        if self._file is None:
            raise ReplayJournalError(f"{self._path} is not open (call rewrite first)")
        self._file.write(_RECORD.pack(expiry, tag))
        self._file.flush()

    def close(self) -> None:
        """Flush to disk and close; safe to call twice."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None


class ReplayCache:
    """Remembers each packet's replay tag until the packet's expiry.

    Bounded by ``capacity``; when full of unexpired tags it fails closed (``OVERLOADED``) instead of forgetting a tag,
    because forgetting one would let that packet be replayed. With a ``journal`` every tag is also written to disk and
    read back on start, and the journal is compacted (expired records dropped) whenever it has grown by ``capacity``
    records. Not thread-safe: one event loop owns it.
    """

    __slots__ = ("_appended", "_capacity", "_clock", "_heap", "_journal", "_tags")

    def __init__(
        self, capacity: int = 200_000, clock: Callable[[], float] = time.time, journal: ReplayJournal | None = None
    ) -> None:
        if capacity < 1:
            raise InvalidPrivacyParam("capacity", capacity, "at least 1")
        self._capacity = capacity
        self._clock = clock
        self._tags: dict[bytes, int] = {}
        self._heap: list[tuple[int, bytes]] = []
        self._journal = journal
        self._appended = 0
        if journal is not None:
            for expiry, tag in journal.load(clock())[-capacity:]:
                self._remember(tag, expiry)
            journal.rewrite(self._entries())

    def __len__(self) -> int:
        return len(self._tags)

    def _entries(self) -> list[tuple[int, bytes]]:
        return [(expiry, tag) for tag, expiry in self._tags.items()]

    def _remember(self, tag: bytes, expiry: int) -> None:
        self._tags[tag] = expiry
        heapq.heappush(self._heap, (expiry, tag))

    def _purge(self) -> None:
        # Keep a tag one granularity past its expiry, matching the hops' clock tolerance.
        horizon = self._clock() - EXPIRY_GRANULARITY
        while self._heap and self._heap[0][0] < horizon:
            _, tag = heapq.heappop(self._heap)
            self._tags.pop(tag, None)

    def seen(self, tag: bytes) -> bool:
        """Whether ``tag`` is remembered: the §5.4 step-5 lookup, made before the slot's expiry is checked. Expired
        tags are purged first, so a tag past its expiry plus one granularity is not "seen"."""
        self._purge()
        return tag in self._tags

    def check_and_add(self, tag: bytes, expiry: int) -> None:
        """Record ``tag``; raise ``MalformedPacket(REPLAY)`` if it was seen, ``OVERLOADED`` if the cache is full."""
        self._purge()
        if tag in self._tags:
            raise MalformedPacket(RejectReason.REPLAY)
        if len(self._tags) >= self._capacity:
            raise MalformedPacket(RejectReason.OVERLOADED, "replay cache full")
        self._remember(tag, expiry)
        if self._journal is not None:
            self._journal.append(tag, expiry)
            self._appended += 1
            if self._appended >= self._capacity:
                self._journal.rewrite(self._entries())
                self._appended = 0

    def close(self) -> None:
        """Close the journal, if any (the cache itself needs no cleanup)."""
        if self._journal is not None:
            self._journal.close()
