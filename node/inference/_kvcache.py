"""A byte-bounded LRU of computed prompt prefixes' key/value tensors, keyed by chained chunk hashes.

Each entry holds one prompt prefix of whole chunks (per layer: keys and values, ``[1, kv_heads, tokens, head_dim]``).
Every chunk hash along that prefix is indexed, so a later prompt that shares only part of it still hits: the entry's
tensors are sliced to the shared length. Stored tensors are private clones and are never written again; a hit hands
out slices, and the caller builds a *new* ``DynamicCache`` from them (whose first ``update`` concatenates into fresh
storage), so reuse can never corrupt an entry. Only the engine's worker thread mutates the cache; ``snapshot`` is
called from the event loop under the engine's lock.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

Layers = tuple[tuple["torch.Tensor", "torch.Tensor"], ...]


@dataclass(slots=True)
class _Entry:
    hashes: list[bytes]
    layers: Layers
    nbytes: int


class PrefixKVCache:
    """LRU prefix cache bounded by ``max_bytes`` (0 disables it)."""

    def __init__(self, max_bytes: int, chunk_tokens: int) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self.chunk_tokens = chunk_tokens
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._index: dict[bytes, tuple[int, int]] = {}  # chunk hash -> (entry id, chunks covered)
        self._next_id = 0
        self.nbytes = 0

    @property
    def enabled(self) -> bool:
        """Whether anything can be stored."""
        return self.max_bytes > 0

    def lookup(self, hashes: list[bytes]) -> tuple[int, Layers | None]:
        """The longest cached prefix of ``hashes``: (chunks, sliced per-layer tensors) or (0, None)."""
        for n in range(len(hashes), 0, -1):
            hit = self._index.get(hashes[n - 1])
            if hit is None:
                continue
            entry_id, _ = hit
            entry = self._entries[entry_id]
            self._entries.move_to_end(entry_id)
            tokens = n * self.chunk_tokens
            if len(entry.hashes) == n:
                return n, entry.layers
            return n, tuple((k[:, :, :tokens, :], v[:, :, :tokens, :]) for k, v in entry.layers)
        return 0, None

    def insert(self, hashes: list[bytes], layers: Layers) -> bool:
        """Store a prefix of ``len(hashes)`` chunks; ``layers`` must already be private (cloned) tensors."""
        if not self.enabled or not hashes:
            return False
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        if nbytes > self.max_bytes:
            return False
        existing = self._index.get(hashes[-1])
        if existing is not None and existing[1] == len(hashes):
            self._entries.move_to_end(existing[0])
            return False
        # An entry that is a strict prefix of this one is now redundant.
        for n in range(len(hashes) - 1, 0, -1):
            hit = self._index.get(hashes[n - 1])
            if hit is not None and len(self._entries[hit[0]].hashes) == n:
                self._drop(hit[0])
                break
        entry_id = self._next_id
        self._next_id += 1
        self._entries[entry_id] = _Entry(hashes=list(hashes), layers=layers, nbytes=nbytes)
        self.nbytes += nbytes
        for i, h in enumerate(hashes):
            self._index[h] = (entry_id, i + 1)
        while self.nbytes > self.max_bytes:
            oldest = next(iter(self._entries))
            self._drop(oldest)
        return True

    def _drop(self, entry_id: int) -> None:
        entry = self._entries.pop(entry_id)
        self.nbytes -= entry.nbytes
        stale = [h for h in entry.hashes if self._index.get(h, (None, 0))[0] == entry_id]
        for h in stale:
            del self._index[h]
        # Another entry may also cover some of these hashes: re-index them, oldest first so newest wins.
        if stale:
            stale_set = set(stale)
            for other_id, other in self._entries.items():
                for i, h in enumerate(other.hashes):
                    if h in stale_set:
                        self._index[h] = (other_id, i + 1)

    def clear(self) -> None:
        """Drop everything."""
        self._entries.clear()
        self._index.clear()
        self.nbytes = 0

    def snapshot(self, limit: int) -> tuple[bytes, ...]:
        """Up to ``limit`` cached chunk hashes, most recently used entries first (the heartbeat summary)."""
        out: list[bytes] = []
        seen: set[bytes] = set()
        for entry in reversed(self._entries.values()):
            for h in entry.hashes:
                if h not in seen:
                    seen.add(h)
                    out.append(h)
                    if len(out) >= limit:
                        return tuple(out)
        return tuple(out)

    def __len__(self) -> int:
        return len(self._entries)
