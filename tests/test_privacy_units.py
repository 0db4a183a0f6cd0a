"""Unit behaviour of the privacy codecs: X25519, parameters, replay cache, path selection, errors."""

from __future__ import annotations

import hashlib
import secrets

import pytest
from Crypto.Protocol import DH

from node import PlanetServeError
from node.privacy import (
    Envelope,
    Hop,
    InsufficientRelays,
    InvalidPrivacyParam,
    MalformedPacket,
    NotEnoughCloves,
    OnionKey,
    PrivacyError,
    RejectReason,
    RelayDescriptor,
    ReplayCache,
    build_onion,
    combine,
    key_id,
    keyring,
    open_reply,
    peel,
    public_key,
    seal_reply,
    select_paths,
    split,
)
from node.privacy._x25519 import x25519


def test_x25519_matches_rfc7748_vector_and_pycryptodome_public_api() -> None:
    scalar = bytes.fromhex("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4")
    u = bytes.fromhex("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c")
    assert x25519(scalar, u).hex() == "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"
    for _ in range(10):
        a, b = secrets.token_bytes(32), secrets.token_bytes(32)
        key_a = DH.import_x25519_private_key(a)
        assert public_key(a) == key_a.public_key().export_key(format="raw")
        expected = DH.key_agreement(
            static_priv=key_a, static_pub=DH.import_x25519_public_key(public_key(b)), kdf=lambda z: z
        )
        assert x25519(a, public_key(b)) == x25519(b, public_key(a)) == expected


def test_x25519_rejects_low_order_points() -> None:
    with pytest.raises(MalformedPacket) as info:
        x25519(secrets.token_bytes(32), bytes(32))
    assert info.value.reason is RejectReason.BAD_KEY


@pytest.mark.parametrize(("n", "k", "param"), [(1, 1, "n"), (17, 3, "n"), (4, 1, "k"), (4, 5, "k")])
def test_split_rejects_bad_parameters(n: int, k: int, param: str) -> None:
    with pytest.raises(InvalidPrivacyParam) as info:
        split(b"m", n, k)
    assert info.value.param == param


def test_split_rejects_oversized_message() -> None:
    with pytest.raises(InvalidPrivacyParam):
        split(bytes(262_145), 4, 3)


def test_combine_of_nothing_or_k_minus_1_says_how_many_are_needed() -> None:
    with pytest.raises(NotEnoughCloves):
        combine([])
    cloves = split(b"secret", 5, 4)
    with pytest.raises(NotEnoughCloves) as info:
        combine([*cloves[:3], cloves[0]])
    assert (info.value.have, info.value.need) == (3, 4)


def test_cloves_of_different_messages_do_not_combine() -> None:
    a, b = split(b"one", 3, 2), split(b"two", 3, 2)
    with pytest.raises(MalformedPacket) as info:
        combine([a[0], b[1]])
    assert info.value.reason is RejectReason.INCONSISTENT


def test_clove_repr_hides_key_share_and_fragment() -> None:
    clove = split(b"private prompt", 3, 2)[0]
    text = repr(clove)
    assert clove.key_share.hex() not in text and "key_share" not in text and "fragment" not in text


def test_errors_share_the_privacy_base_and_root() -> None:
    for cls in (MalformedPacket, NotEnoughCloves, InvalidPrivacyParam, InsufficientRelays):
        assert issubclass(cls, PrivacyError)
    assert issubclass(PrivacyError, PlanetServeError)
    assert MalformedPacket(RejectReason.REPLAY).code.startswith("invalid")


def test_build_onion_rejects_bad_paths() -> None:
    hop = Hop(node_id=secrets.token_bytes(20), public_key=public_key(secrets.token_bytes(32)))
    with pytest.raises(InvalidPrivacyParam):
        build_onion([], b"x")
    with pytest.raises(InvalidPrivacyParam):
        build_onion([hop] * 7, b"x")
    with pytest.raises(InvalidPrivacyParam):
        build_onion([hop, hop], b"x" * 200_000)


@pytest.mark.parametrize(
    ("node_id", "key", "param"), [(b"x" * 19, 32, "node_id"), (bytes(20), 32, "node_id"), (b"x" * 20, 31, "public_key")]
)
def test_a_hop_is_a_20_byte_registry_id_and_a_32_byte_key(node_id: bytes, key: int, param: str) -> None:
    with pytest.raises(InvalidPrivacyParam) as info:
        Hop(node_id=node_id, public_key=bytes(key))
    assert info.value.param == param


def test_a_relay_descriptor_hop_needs_a_hex_registry_id() -> None:
    address = "0x" + secrets.token_hex(20)
    good = RelayDescriptor(node_id=address, operator="o", endpoint="http://h:1", public_key=bytes(32))
    assert good.hop().node_id == bytes.fromhex(address[2:])
    with pytest.raises(InvalidPrivacyParam) as info:
        RelayDescriptor(node_id="relay0", operator="o", endpoint="http://h:1", public_key=bytes(32)).hop()
    assert info.value.param == "node_id"


def test_key_ids_are_the_first_8_bytes_of_sha256_of_the_public_key() -> None:
    key = OnionKey(secrets.token_bytes(32))
    assert key.key_id == key_id(key.public) == hashlib.sha256(key.public).digest()[:8]
    assert "secret" not in repr(key) and key.secret.hex() not in repr(key)


def test_peel_rejects_an_unknown_key_id_and_a_key_that_is_not_the_recipients() -> None:
    mine, other = OnionKey(secrets.token_bytes(32)), OnionKey(secrets.token_bytes(32))
    packet = build_onion([Hop(node_id=b"n" * 20, public_key=mine.public)], b"clove").packet
    with pytest.raises(MalformedPacket) as unknown:
        peel(packet, keyring(other))
    assert unknown.value.reason is RejectReason.UNKNOWN_KEY
    with pytest.raises(MalformedPacket) as wrong:
        peel(packet, {mine.key_id: other})  # a keyring that files a wrong key under the id: the header MAC fails
    assert wrong.value.reason is RejectReason.BAD_MAC
    assert peel(packet, keyring(other, mine)).keys.replay_tag


def test_reply_chunks_round_trip_and_bind_the_key() -> None:
    key = secrets.token_bytes(32)
    sealed = seal_reply(key, 7, b"tokens", final=True)
    chunk = open_reply(key, sealed)
    assert (chunk.seq, chunk.data, chunk.final, chunk.error) == (7, b"tokens", True, False)
    with pytest.raises(MalformedPacket):
        open_reply(secrets.token_bytes(32), sealed)
    with pytest.raises(InvalidPrivacyParam):
        seal_reply(key, 0, bytes(16_385))


def test_envelope_rejects_length_mismatch() -> None:
    raw = Envelope(reply_key=bytes(32), body=b"abc").to_bytes()
    assert Envelope.from_bytes(raw).body == b"abc"
    with pytest.raises(MalformedPacket) as info:
        Envelope.from_bytes(raw + b"x")
    assert info.value.reason is RejectReason.BAD_LENGTH


def test_replay_cache_drops_duplicates_until_expiry_then_forgets() -> None:
    clock = [1000.0]
    cache = ReplayCache(capacity=2, clock=lambda: clock[0])
    cache.check_and_add(b"a", expiry=1010)
    with pytest.raises(MalformedPacket) as info:
        cache.check_and_add(b"a", expiry=1010)
    assert info.value.reason is RejectReason.REPLAY
    cache.check_and_add(b"b", expiry=1100)
    with pytest.raises(MalformedPacket) as full:
        cache.check_and_add(b"c", expiry=1100)
    assert full.value.reason is RejectReason.OVERLOADED
    clock[0] = 1030.0  # "a" expired more than one granularity ago
    cache.check_and_add(b"c", expiry=1100)
    assert len(cache) == 2


def _relay(i: int, operator: str, reputation: float = 1.0, liveness: float = 1.0) -> RelayDescriptor:
    return RelayDescriptor(
        node_id=f"node{i}",
        operator=operator,
        endpoint=f"http://127.0.0.1:{30000 + i}",
        public_key=public_key(secrets.token_bytes(32)),
        reputation=reputation,
        liveness=liveness,
    )


def test_paths_have_distinct_operators_and_no_reuse_when_the_pool_allows() -> None:
    relays = [_relay(i, f"op{i}") for i in range(12)]
    paths = select_paths(relays, 4, 3)
    assert [len(p) for p in paths] == [3, 3, 3, 3]
    ids = [r.node_id for p in paths for r in p]
    assert len(set(ids)) == 12
    for p in paths:
        assert len({r.operator for r in p}) == 3


def test_paths_reuse_relays_only_when_needed_and_never_within_a_path() -> None:
    relays = [_relay(i, f"op{i % 4}") for i in range(5)]
    for _ in range(20):
        for p in select_paths(relays, 4, 3):
            assert len({r.operator for r in p}) == 3


def test_paths_exclude_operators_and_zero_weight_and_prefer_reputation() -> None:
    relays = [_relay(0, "dest"), _relay(1, "a"), _relay(2, "b"), _relay(3, "c", liveness=0.0)]
    relays += [_relay(4, "d", reputation=1.0), _relay(5, "e", reputation=0.01)]
    counts = {"node4": 0, "node5": 0}
    for _ in range(300):
        (path,) = select_paths(relays, 1, 1, exclude_operators=["dest"])
        assert path[0].node_id not in {"node0", "node3"}
        if path[0].node_id in counts:
            counts[path[0].node_id] += 1
    assert counts["node4"] > 5 * max(counts["node5"], 1)


def test_paths_raise_when_too_few_operators() -> None:
    relays = [_relay(i, "same") for i in range(5)]
    with pytest.raises(InsufficientRelays) as info:
        select_paths(relays, 2, 3)
    assert (info.value.needed, info.value.available) == (3, 1)


def test_relay_descriptor_validates_fields() -> None:
    with pytest.raises(InvalidPrivacyParam):
        _relay(0, "x", reputation=1.5)
    with pytest.raises(InvalidPrivacyParam):
        RelayDescriptor(node_id="n", operator="o", endpoint="http://h:1", public_key=b"short")
