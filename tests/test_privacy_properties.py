"""Hypothesis properties of S-IDA and the onion (issue 4, "Done when")."""

from __future__ import annotations

import itertools
import random
import secrets

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.privacy import (
    Clove,
    Hop,
    MalformedPacket,
    NotEnoughCloves,
    OnionKey,
    PeeledExit,
    PeeledForward,
    build_onion,
    combine,
    keyring,
    peel,
    split,
)
from node.privacy._constants import MAX_HOPS, ONION_HEADER_LEN

PAIRS = [(n, k) for n in range(2, 9) for k in range(2, n + 1)]
FAST = settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _message(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.mark.parametrize(("n", "k"), PAIRS, ids=[f"n{n}k{k}" for n, k in PAIRS])
@FAST
@given(size=st.integers(0, 65536), seed=st.integers(0, 2**32), data=st.data())
def test_any_k_of_n_cloves_rebuild_and_k_minus_1_fail(
    n: int, k: int, size: int, seed: int, data: st.DataObject
) -> None:
    message = _message(size, seed)
    wire = [c.to_bytes() for c in split(message, n, k)]
    assert sum(map(len, wire)) == n * (85 + -(-size // k))
    subset = data.draw(st.permutations(range(n)))[:k]
    assert combine(Clove.from_bytes(wire[i]) for i in subset) == message
    with pytest.raises(NotEnoughCloves):
        combine(Clove.from_bytes(wire[i]) for i in subset[:-1])


def test_every_subset_of_size_k_rebuilds_for_4_of_6() -> None:
    message = secrets.token_bytes(3000)
    cloves = split(message, 6, 4)
    for subset in itertools.combinations(cloves, 4):
        assert combine(subset) == message


@settings(max_examples=60, deadline=None)
@given(
    nk=st.sampled_from(PAIRS),
    size=st.integers(0, 4096),
    seed=st.integers(0, 2**32),
    which=st.integers(0, 7),
    bit=st.integers(0, 2**40),
)
def test_any_single_flipped_bit_in_any_clove_is_detected(
    nk: tuple[int, int], size: int, seed: int, which: int, bit: int
) -> None:
    n, k = nk
    message = _message(size, seed)
    wire = [c.to_bytes() for c in split(message, n, k)][:k]
    target = which % k
    mutable = bytearray(wire[target])
    position = bit % (len(mutable) * 8)
    mutable[position // 8] ^= 1 << (position % 8)
    wire[target] = bytes(mutable)
    with pytest.raises((MalformedPacket, NotEnoughCloves)):
        combine([Clove.from_bytes(w) for w in wire])


def _path(length: int) -> tuple[list[Hop], list[dict[bytes, OnionKey]]]:
    keys = [OnionKey(secrets.token_bytes(32)) for _ in range(length)]
    hops = [Hop(node_id=secrets.token_bytes(20), public_key=k.public) for k in keys]
    return hops, [keyring(k) for k in keys]


@settings(max_examples=25, deadline=None)
@given(length=st.integers(1, MAX_HOPS), clove_size=st.integers(0, 3000), seed=st.integers(0, 2**32))
def test_peel_at_each_hop_yields_the_next_hop_only_and_constant_size(length: int, clove_size: int, seed: int) -> None:
    hops, secrets_ = _path(length)
    clove = _message(clove_size, seed) + b"MARKER-CLOVE-PLAINTEXT"
    built = build_onion(hops, clove)
    packet = built.packet
    size = len(packet)
    payload_len = size - ONION_HEADER_LEN
    for i, secret in enumerate(secrets_):
        assert len(packet) == size
        assert b"MARKER-CLOVE-PLAINTEXT" not in packet
        # A node that is not this hop learns nothing: it does not hold the key, even under this key id.
        other = OnionKey(secrets.token_bytes(32))
        with pytest.raises(MalformedPacket):
            peel(packet, keyring(other))
        with pytest.raises(MalformedPacket):
            peel(packet, {packet[2:10]: other})
        result = peel(packet, secret)
        if i < length - 1:
            assert isinstance(result, PeeledForward)
            assert result.next_node == hops[i + 1].node_id
            packet = result.packet
        else:
            assert isinstance(result, PeeledExit)
            assert result.clove == clove
    assert payload_len % 256 == 0


def test_header_size_is_the_same_for_every_path_length() -> None:
    sizes = set()
    for length in range(1, MAX_HOPS + 1):
        hops, _ = _path(length)
        sizes.add(len(build_onion(hops, b"x" * 100).packet))
    assert sizes == {ONION_HEADER_LEN + 256}


@settings(max_examples=80, deadline=None)
@given(length=st.integers(2, MAX_HOPS), hop=st.integers(0, MAX_HOPS - 1), bit=st.integers(0, 2**40))
def test_any_single_flipped_bit_in_an_onion_packet_is_detected(length: int, hop: int, bit: int) -> None:
    hops, secrets_ = _path(length)
    packet = build_onion(hops, b"clove" * 20).packet
    hop %= length
    for secret in secrets_[:hop]:
        result = peel(packet, secret)
        assert isinstance(result, PeeledForward)
        packet = result.packet
    mutable = bytearray(packet)
    position = bit % (len(mutable) * 8)
    mutable[position // 8] ^= 1 << (position % 8)
    with pytest.raises(MalformedPacket):
        peel(bytes(mutable), secrets_[hop])


@pytest.mark.parametrize(("n", "k"), PAIRS, ids=[f"n{n}k{k}" for n, k in PAIRS])
def test_64_kib_message_rebuilds_from_the_last_k_cloves(n: int, k: int) -> None:
    message = secrets.token_bytes(65536)
    cloves = split(message, n, k)
    assert combine(cloves[n - k :]) == message
