"""Prefix-chunk hashing (shared with routing) and the byte-bounded LRU prefix KV cache."""

from __future__ import annotations

import hashlib
import struct

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from node.inference import CHUNK_TOKENS, chunk_hashes, longest_match
from node.inference._kvcache import PrefixKVCache


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


def _layers(tokens: int, fill: float) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    k = torch.full((1, 2, tokens, 4), fill)
    return ((k, k.clone()),)


def _hashes(seed: int, chunks: int) -> list[bytes]:
    return chunk_hashes([seed] * (chunks * CHUNK_TOKENS))


def test_lookup_returns_the_longest_cached_prefix_sliced_to_the_shared_length() -> None:
    cache = PrefixKVCache(max_bytes=1 << 20, chunk_tokens=CHUNK_TOKENS)
    stored = _hashes(1, 4)
    assert cache.insert(stored, _layers(64, 1.0))
    n, layers = cache.lookup(stored[:2] + _hashes(9, 3)[2:])
    assert n == 2 and layers is not None
    assert layers[0][0].shape[2] == 32
    n, layers = cache.lookup(stored)
    assert n == 4 and layers is not None and layers[0][0].shape[2] == 64
    assert cache.lookup(_hashes(2, 4)) == (0, None)


def test_a_longer_prefix_supersedes_its_stored_prefix() -> None:
    cache = PrefixKVCache(max_bytes=1 << 20, chunk_tokens=CHUNK_TOKENS)
    long = _hashes(1, 4)
    cache.insert(long[:2], _layers(32, 1.0))
    cache.insert(long, _layers(64, 2.0))
    assert len(cache) == 1
    n, layers = cache.lookup(long[:2])
    assert n == 2 and layers is not None and layers[0][0].shape[2] == 32 and float(layers[0][0][0, 0, 0, 0]) == 2.0


def test_least_recently_used_entries_are_evicted_to_stay_within_bytes() -> None:
    one = 2 * 2 * 64 * 4 * 4  # keys + values, 2 heads x 64 tokens x 4 dims x 4 bytes
    cache = PrefixKVCache(max_bytes=2 * one, chunk_tokens=CHUNK_TOKENS)
    a, b, c = _hashes(1, 4), _hashes(2, 4), _hashes(3, 4)
    cache.insert(a, _layers(64, 1.0))
    cache.insert(b, _layers(64, 2.0))
    cache.lookup(a)  # a becomes most recently used
    cache.insert(c, _layers(64, 3.0))
    assert cache.nbytes <= 2 * one
    assert cache.lookup(b) == (0, None)
    assert cache.lookup(a)[0] == 4 and cache.lookup(c)[0] == 4
    assert not cache.insert(_hashes(4, 20), _layers(320, 4.0)), "an entry larger than the cache is not stored"


def test_snapshot_lists_most_recent_hashes_first_and_is_bounded() -> None:
    cache = PrefixKVCache(max_bytes=1 << 20, chunk_tokens=CHUNK_TOKENS)
    a, b = _hashes(1, 3), _hashes(2, 3)
    cache.insert(a, _layers(48, 1.0))
    cache.insert(b, _layers(48, 1.0))
    assert cache.snapshot(10) == (*b, *a)
    assert cache.snapshot(2) == tuple(b[:2])


def test_a_zero_byte_cache_is_disabled() -> None:
    cache = PrefixKVCache(max_bytes=0, chunk_tokens=CHUNK_TOKENS)
    assert not cache.enabled
    assert not cache.insert(_hashes(1, 2), _layers(32, 1.0))
