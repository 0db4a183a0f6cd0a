"""Prefix-chunk hashing (shared with routing) and the engine's block pool (shared, reference-counted KV blocks)."""

from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.inference import CHUNK_TOKENS, chunk_hashes, longest_match
from node.inference._kvcache import BlockPool
from node.inference._prefix import ROOT, chain_hash


def test_chunk_hashes_follow_the_documented_chained_blake2b_construction() -> None:
    tokens = list(range(40))
    prev = bytes(8)
    expected = []
    for i in range(2):
        packed = struct.pack("<16I", *tokens[i * 16 : (i + 1) * 16])
        prev = hashlib.blake2b(prev + packed, digest_size=8).digest()
        expected.append(prev)
    assert chunk_hashes(tokens) == expected


def test_a_trailing_partial_chunk_is_ignored_and_limit_caps_the_work() -> None:
    assert chunk_hashes(list(range(15))) == []
    assert len(chunk_hashes(list(range(47)))) == 2
    assert len(chunk_hashes(list(range(160)), limit=3)) == 3


def test_equal_chunks_at_different_prefixes_hash_differently() -> None:
    chunk = list(range(16))
    a = chunk_hashes([1] * 16 + chunk)
    b = chunk_hashes([2] * 16 + chunk)
    assert a[1] != b[1]


def test_salt_separates_models_and_must_be_eight_bytes() -> None:
    tokens = list(range(32))
    assert chunk_hashes(tokens, salt=b"\x01" * 8) != chunk_hashes(tokens)
    with pytest.raises(ValueError, match="salt"):
        chunk_hashes(tokens, salt=b"short")


@given(st.lists(st.integers(0, 2**32 - 1), max_size=100), st.lists(st.integers(0, 2**32 - 1), max_size=100))
def test_longest_match_counts_exactly_the_shared_whole_chunks(a: list[int], b: list[int]) -> None:
    shared = 0
    while shared < min(len(a), len(b)) and a[shared] == b[shared]:
        shared += 1
    assert longest_match(chunk_hashes(a), set(chunk_hashes(b))) == min(
        shared // CHUNK_TOKENS, len(a) // CHUNK_TOKENS, len(b) // CHUNK_TOKENS
    )


def test_chain_hash_extends_the_chain_one_chunk_at_a_time() -> None:
    tokens = list(range(48))
    expected = chunk_hashes(tokens)
    prev = ROOT
    for i, want in enumerate(expected):
        prev = chain_hash(prev, tokens[i * CHUNK_TOKENS : (i + 1) * CHUNK_TOKENS])
        assert prev == want
    with pytest.raises(ValueError, match="exactly"):
        chain_hash(ROOT, [1, 2, 3])


def _hashes(seed: int, chunks: int) -> list[bytes]:
    return chunk_hashes([seed] * (chunks * CHUNK_TOKENS))


def _fill(pool: BlockPool, hashes: list[bytes], shared: list[int] | None = None) -> list[int]:
    """Simulate one sequence: reuse ``shared`` blocks, allocate and commit the rest; returns its block table."""
    table = list(shared or [])
    pool.acquire(table)
    for i in range(len(table), len(hashes)):
        block = pool.allocate()
        assert block is not None
        table.append(pool.commit(block, hashes[i], table[i - 1] if i else None))
    return table


def test_equal_prefixes_are_stored_once_even_when_computed_concurrently() -> None:
    pool = BlockPool(32, CHUNK_TOKENS, max_cached=32)
    prefix = _hashes(1, 3)
    a = _fill(pool, prefix + _hashes(2, 5)[3:])
    b = _fill(pool, prefix + _hashes(3, 5)[3:])  # computed its own copy of the prefix: committed onto a's blocks
    assert a[:3] == b[:3]
    assert pool.cached_blocks() == len(set(prefix + _hashes(2, 5)[3:] + _hashes(3, 5)[3:])) == 7
    assert all(pool.refs(block) == 2 for block in a[:3])
    assert pool.available() == 32 - 7
    pool.release(a)
    pool.release(b)
    assert pool.available() == 32 and pool.cached_blocks() == 7
    assert pool.match([*prefix, b"x" * 8]) == a[:3]


def test_eviction_takes_unused_leaves_lru_first_and_never_a_block_in_use() -> None:
    pool = BlockPool(6, CHUNK_TOKENS, max_cached=6)
    old = _fill(pool, _hashes(1, 2))
    pool.release(old)
    in_use = _fill(pool, _hashes(2, 2))
    newer = _fill(pool, _hashes(3, 2))
    pool.release(newer)
    assert pool.available() == 4
    # The oldest chain goes first, deepest block first; the chain in use is never touched.
    first = pool.allocate()
    assert first == old[1] and pool.match(_hashes(1, 2)) == old[:1]
    assert pool.allocate() == old[0]
    assert pool.allocate() == newer[1] and pool.allocate() == newer[0]
    assert pool.allocate() is None, "only blocks in use are left"
    assert pool.match(_hashes(2, 2)) == in_use and all(pool.refs(b) == 1 for b in in_use)


@given(st.lists(st.tuples(st.sampled_from(["start", "stop"]), st.integers(0, 5)), max_size=60))
def test_random_workloads_never_evict_or_reallocate_a_block_in_use(ops: list[tuple[str, int]]) -> None:
    pool = BlockPool(10, CHUNK_TOKENS, max_cached=8)
    tables: dict[int, list[int]] = {}
    for op, key in ops:
        if op == "start" and key not in tables:
            hashes = _hashes(key % 3, 2) + _hashes(key, 3)[2:]  # keys share prefixes modulo 3
            shared = pool.match(hashes)
            needed = len(hashes) - len(shared)
            idle_shared = sum(1 for b in shared if pool.refs(b) == 0)
            if pool.available() - idle_shared < needed:
                continue
            tables[key] = _fill(pool, hashes, shared)
        elif op == "stop" and key in tables:
            pool.release(tables.pop(key))
        in_use = [b for table in tables.values() for b in table]
        for key2, table in tables.items():
            expected = _hashes(key2 % 3, 2) + _hashes(key2, 3)[2:]
            assert [pool.hash_of(b) for b in table] == expected, "a block in use lost its contents"
        assert all(pool.refs(b) >= 1 for b in in_use)
        assert pool.cached_blocks() <= max(8, len(set(in_use)))


def test_snapshot_lists_most_recently_used_hashes_first_and_is_bounded() -> None:
    pool = BlockPool(16, CHUNK_TOKENS, max_cached=16)
    a, b = _hashes(1, 3), _hashes(2, 3)
    pool.release(_fill(pool, a))
    pool.release(_fill(pool, b))
    assert pool.snapshot(10) == (*reversed(b), *reversed(a))
    assert len(pool.snapshot(2)) == 2


def test_max_cached_zero_disables_reuse_and_bounds_what_stays_cached() -> None:
    off = BlockPool(8, CHUNK_TOKENS, max_cached=0)
    table = _fill(off, _hashes(1, 3))
    assert off.cached_blocks() == 0 and off.match(_hashes(1, 3)) == []
    off.release(table)
    assert off.available() == 8
    bounded = BlockPool(8, CHUNK_TOKENS, max_cached=2)
    bounded.release(_fill(bounded, _hashes(1, 4)))
    assert bounded.cached_blocks() == 2 and len(bounded.match(_hashes(1, 4))) == 2
