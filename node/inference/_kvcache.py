"""The torch engine's KV memory: 16-token blocks, reference-counted, shared between sequences, LRU from the leaves.

Why blocks (the design vLLM's block manager and SGLang's radix cache share, narrowed to what we need):

* Every sequence's KV lives in blocks of :data:`~node.inference._prefix.CHUNK_TOKENS` tokens, the same chunks whose
  chained hashes the node advertises. A block that is full gets its chained hash; a block with that hash is stored
  **once**, however many sequences use it, so what the node advertises is exactly what it holds.
* A block's reference count is the number of running sequences whose block table holds it. Blocks with count 0 that
  carry a hash stay cached for later prompts; they are evicted least recently used first, and only **leaves** (no
  cached child block), so a cached prefix always shrinks from its end and the chain stays intact. A block with a
  count above 0 is never evicted: ``allocate`` returns None instead.
* Full blocks are never written again (a sequence only appends to its private, not yet full, last block), so sharing
  needs no copy-on-write.

Storage is one tensor per keys/values, ``[layers, blocks, kv_heads, block_tokens, head_dim]``, created on the first
``ensure_storage`` call (``torch.empty``, so untouched CPU pages cost nothing; a block is zeroed when allocated).
Only the engine's worker thread calls the mutating methods; the event loop reads the counters under the engine's lock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(slots=True)
class _Meta:
    refs: int = 0
    hash: bytes | None = None
    parent: int | None = None
    children: int = 0


class BlockPool:
    """``num_blocks`` KV blocks of ``block_tokens`` tokens; at most ``max_cached`` of them keep a hash (0: no reuse)."""

    def __init__(self, num_blocks: int, block_tokens: int, *, max_cached: int) -> None:
        if num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        if max_cached < 0:
            raise ValueError("max_cached must be >= 0")
        self.num_blocks = num_blocks
        self.block_tokens = block_tokens
        self.max_cached = min(max_cached, num_blocks)
        self._meta = [_Meta() for _ in range(num_blocks)]
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # hashed, refs == 0; oldest first
        self._by_hash: dict[bytes, int] = {}
        self._recent: OrderedDict[int, None] = OrderedDict()  # hashed blocks, least recently used first
        self.keys: Any = None
        self.values: Any = None
        self.block_bytes = 0

    # --------------------------------------------------------------------------------------------------- storage
    def ensure_storage(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: Any) -> None:
        """Create the block tensors for this model shape (once)."""
        import torch

        if self.keys is not None:
            return
        shape = (layers, self.num_blocks, kv_heads, self.block_tokens, head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.block_bytes = 2 * layers * kv_heads * self.block_tokens * head_dim * self.keys.element_size()

    # ------------------------------------------------------------------------------------------------ accounting
    @property
    def reuse(self) -> bool:
        """Whether full blocks are hashed and kept for later prompts."""
        return self.max_cached > 0

    def available(self) -> int:
        """Blocks that ``allocate`` can hand out now (free, or cached and unused)."""
        return len(self._free) + len(self._evictable)

    def cached_blocks(self) -> int:
        """Blocks that carry a hash (in use or not): the prefix cache's rows, each stored once."""
        return len(self._by_hash)

    def refs(self, block: int) -> int:
        """The block's reference count."""
        return self._meta[block].refs

    def hash_of(self, block: int) -> bytes | None:
        """The block's chained hash, None while it is not full (or reuse is off)."""
        return self._meta[block].hash

    def snapshot(self, limit: int) -> tuple[bytes, ...]:
        """Up to ``limit`` cached block hashes, most recently used first (the heartbeat summary)."""
        out: list[bytes] = []
        for block in reversed(self._recent):
            h = self._meta[block].hash
            assert h is not None
            out.append(h)
            if len(out) >= limit:
                break
        return tuple(out)

    # ---------------------------------------------------------------------------------------------- operations
    def match(self, hashes: Sequence[bytes]) -> list[int]:
        """Block ids of the longest cached prefix of ``hashes`` (no reference taken)."""
        out: list[int] = []
        if not self.reuse:
            return out
        for h in hashes:
            block = self._by_hash.get(h)
            if block is None:
                break
            out.append(block)
        return out

    def acquire(self, blocks: Sequence[int]) -> None:
        """Take a reference on each block (a sequence starts using a cached prefix)."""
        for block in blocks:
            meta = self._meta[block]
            if meta.refs == 0:
                self._evictable.pop(block, None)
            meta.refs += 1
            if meta.hash is not None:
                self._recent.move_to_end(block)

    def allocate(self) -> int | None:
        """A fresh block with one reference, evicting the least recently used cached leaf if needed; None if full."""
        if self._free:
            block = self._free.pop()
        else:
            victim = self._lru_leaf()
            if victim is None:
                return None
            self._evict(victim)
            block = self._free.pop()
        self._meta[block].refs = 1
        if self.keys is not None:
            # Rows past a sequence's end are read (masked) by batched attention: they must be finite, and storage
            # from ``torch.empty`` or an evicted block may hold anything, NaN included (NaN x 0 weight is NaN).
            self.keys[:, block].zero_()
            self.values[:, block].zero_()
        return block

    def commit(self, block: int, block_hash: bytes, parent: int | None) -> int:
        """Give a just-filled block (held once, by its writer) its chained hash; returns the block to use.

        If another sequence already stored a block with this hash, this copy is freed and the stored one gains a
        reference instead, so equal prefixes are never held twice.
        """
        if not self.reuse:
            return block
        existing = self._by_hash.get(block_hash)
        if existing is not None and existing != block:
            self.release([block])
            self.acquire([existing])
            return existing
        meta = self._meta[block]
        meta.hash = block_hash
        meta.parent = parent
        if parent is not None:
            self._meta[parent].children += 1
        self._by_hash[block_hash] = block
        self._recent[block] = None
        self._recent.move_to_end(block)
        self.trim()
        return block

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference on each block of a sequence's table (given in order).

        The tail is released first, so within one prefix the deeper blocks are the older ones and leave first.
        """
        for block in reversed(blocks):
            meta = self._meta[block]
            if meta.refs <= 0:
                raise ValueError(f"block {block} released more often than acquired")
            meta.refs -= 1
            if meta.refs == 0:
                if meta.hash is None:
                    self._free.append(block)
                else:
                    self._evictable[block] = None
        self.trim()

    def trim(self) -> None:
        """Evict unused cached leaves while more than ``max_cached`` blocks carry a hash."""
        while len(self._by_hash) > self.max_cached:
            victim = self._lru_leaf()
            if victim is None:
                return
            self._evict(victim)

    def clear(self) -> None:
        """Evict every unused cached block (blocks in use keep their hash)."""
        while True:
            victim = self._lru_leaf()
            if victim is None:
                return
            self._evict(victim)

    def _lru_leaf(self) -> int | None:
        for block in self._evictable:
            if self._meta[block].children == 0:
                return block
        return None

    def _evict(self, block: int) -> None:
        meta = self._meta[block]
        assert meta.refs == 0 and meta.children == 0 and meta.hash is not None
        del self._evictable[block]
        del self._by_hash[meta.hash]
        del self._recent[block]
        if meta.parent is not None:
            self._meta[meta.parent].children -= 1
        meta.hash = None
        meta.parent = None
        self._free.append(block)
