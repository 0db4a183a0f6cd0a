"""The codecs reproduce ``tests/vectors/*.json`` (docs/protocol.md §9) and reject every must-reject case."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node.privacy import (
    Clove,
    Envelope,
    MalformedPacket,
    OnionKey,
    PeeledExit,
    PeeledForward,
    combine,
    key_id,
    keyring,
    open_reply,
    peel,
)
from node.privacy import _gf256 as gf
from node.privacy._constants import REPLY_FRAME_LEN
from node.privacy._onion import Hop, build_onion, reply_link_key
from node.privacy._reply import (
    FrameReader,
    check_frame_len,
    destination_layer_key,
    strip_reply_layers,
)
from node.privacy._sida import split
from tests.vectors import generate

VECTORS = Path(__file__).parent / "vectors"


def load(name: str) -> dict[str, Any]:
    content: dict[str, Any] = json.loads((VECTORS / name).read_text())
    return content


def test_generator_reproduces_committed_vectors_byte_for_byte() -> None:
    for name, content in generate.build_all().items():
        assert (VECTORS / name).read_text() == generate.render(content), name


def test_gf256_products_and_inverses_match_vectors() -> None:
    v = load("gf256.json")
    for p in v["products"]:
        assert gf.mul(p["a"], p["b"]) == p["product"]
    for p in v["inverses"]:
        assert gf.mul(p["a"], p["inverse"]) == 1
        assert gf.inv(p["a"]) == p["inverse"]


def test_sida_split_with_fixed_randomness_matches_vector_cloves() -> None:
    for case in load("sida.json")["cases"]:
        draws = [bytes.fromhex(case[f]) for f in ("key", "nonce", "message_id", "coefficients")]
        feed = iter(draws)

        def randbytes(size: int, feed: Iterator[bytes] = feed) -> bytes:
            return next(feed)

        cloves = split(bytes.fromhex(case["message"]), case["n"], case["k"], randbytes=randbytes)
        assert [c.to_bytes().hex() for c in cloves] == case["cloves"]


def test_sida_vector_cloves_rebuild_the_message() -> None:
    for case in load("sida.json")["cases"]:
        cloves = [Clove.from_bytes(bytes.fromhex(h)) for h in case["cloves"]]
        assert combine(cloves[-case["k"] :]).hex() == case["message"]


@pytest.mark.parametrize("case", load("sida.json")["must_reject_parse"], ids=lambda c: c["name"])
def test_sida_parse_rejects_vector(case: dict[str, Any]) -> None:
    with pytest.raises(MalformedPacket) as info:
        Clove.from_bytes(bytes.fromhex(case["clove"]))
    assert info.value.reason.value == case["reason"]


@pytest.mark.parametrize("case", load("sida.json")["must_reject_combine"], ids=lambda c: c["name"])
def test_sida_combine_rejects_vector(case: dict[str, Any]) -> None:
    with pytest.raises(MalformedPacket) as info:
        combine(Clove.from_bytes(bytes.fromhex(h)) for h in case["cloves"])
    assert info.value.reason.value == case["reason"]


ONION = load("onion.json")


def _ring(hop: dict[str, Any]) -> dict[bytes, OnionKey]:
    return keyring(OnionKey(bytes.fromhex(hop["node_secret"])))


def test_onion_vectors_cover_every_path_length() -> None:
    assert [c["length"] for c in ONION["cases"]] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("case", ONION["cases"], ids=lambda c: f"{c['length']}-hops")
def test_onion_vector_hops_peel_to_expected_keys_and_next_hops(case: dict[str, Any]) -> None:
    hops = case["hops"]
    path = [Hop(node_id=bytes.fromhex(h["node_id"]), public_key=bytes.fromhex(h["node_public"])) for h in hops]
    built = build_onion(
        path,
        bytes.fromhex(case["clove"]),
        ttl=ONION["ttl"],
        now=ONION["now"],
        ephemeral_secrets=[bytes.fromhex(h["ephemeral_secret"]) for h in hops],
        randbytes=lambda size: bytes.fromhex(case["routing_padding"]),
    )
    assert built.packet.hex() == hops[0]["packet_in"]
    assert built.expiry == case["expiry"]
    for i, hop in enumerate(hops):
        packet = bytes.fromhex(hop["packet_in"])
        assert packet[2:10].hex() == hop["key_id"] == key_id(bytes.fromhex(hop["node_public"])).hex()
        assert packet[10:42].hex() == hop["ephemeral_public"]
        result = peel(packet, _ring(hop), now=ONION["now"])
        assert result.keys.mac.hex() == hop["k_mac"]
        assert result.keys.gcm.hex() == hop["k_gcm"]
        assert result.keys.rho.hex() == hop["k_rho"]
        assert result.keys.reply.hex() == hop["k_reply"]
        assert result.keys.replay_tag.hex() == hop["replay_tag"]
        assert len(packet) == len(bytes.fromhex(hops[0]["packet_in"]))
        if i < len(hops) - 1:
            assert isinstance(result, PeeledForward)
            assert result.next_node.hex() == hop["next_node"] == hops[i + 1]["node_id"]
            next_link = reply_link_key(bytes.fromhex(hops[i + 1]["k_reply"]))
            assert result.next_link_key.hex() == hop["next_link_key"] == next_link.hex()
            assert result.packet.hex() == hops[i + 1]["packet_in"]
        else:
            assert isinstance(result, PeeledExit)
            assert result.clove.hex() == case["clove"]


@pytest.mark.parametrize("case", ONION["must_reject"], ids=lambda c: c["name"])
def test_onion_rejects_vector(case: dict[str, Any]) -> None:
    assert ONION["must_reject_hop"] == "cases[3].hops[0]"
    with pytest.raises(MalformedPacket) as info:
        peel(bytes.fromhex(case["packet"]), _ring(ONION["cases"][3]["hops"][0]), now=ONION["now"])
    assert info.value.reason.value == case["reason"]


def test_onion_vector_packet_is_rejected_after_its_expiry() -> None:
    hop = ONION["cases"][3]["hops"][0]
    with pytest.raises(MalformedPacket) as info:
        peel(bytes.fromhex(hop["packet_in"]), _ring(hop), now=ONION["expired_at"])
    assert info.value.reason.value == "expired"


def test_onion_replay_lookup_comes_before_the_expiry_check() -> None:
    """§5.4: a replayed packet is REPLAY even when it has expired meanwhile (step 5 before step 6)."""
    hop = ONION["cases"][3]["hops"][0]
    tag = bytes.fromhex(hop["replay_tag"])
    with pytest.raises(MalformedPacket) as info:
        peel(bytes.fromhex(hop["packet_in"]), _ring(hop), now=ONION["expired_at"], seen=lambda t: t == tag)
    assert info.value.reason.value == "replay"


def test_reply_vector_frames_decrypt_in_order() -> None:
    v = load("reply.json")
    key = bytes.fromhex(v["reply_key"])
    envelope = Envelope.from_bytes(bytes.fromhex(v["envelope"]))
    assert envelope.reply_key == key
    assert envelope.body == bytes.fromhex(v["envelope_body"])
    layers = (
        *(bytes.fromhex(k) for k in v["relay_k_reply"]),
        destination_layer_key(key, v["clove_index"]),
    )
    reader = FrameReader(reply_link_key(bytes.fromhex(v["relay_k_reply"][0])))
    frames = [bytes.fromhex(f) for f in v["frames_by_link"]["hop0_to_client"]]
    for index, (frame, chunk) in enumerate(zip(frames, v["chunks"], strict=False)):
        assert len(frame) == REPLY_FRAME_LEN
        body = reader.open(frame[4 : 4 + check_frame_len(frame[:4])])
        opened = open_reply(key, strip_reply_layers(layers, index, body))
        assert (opened.seq, opened.data.hex(), opened.final, opened.error) == (
            chunk["seq"],
            chunk["data"],
            chunk["final"],
            chunk["error"],
        )


def test_reply_vector_final_error_chunk_opens_as_a_failure() -> None:
    v = load("reply.json")
    chunk = v["chunks"][-1]
    opened = open_reply(bytes.fromhex(v["reply_key"]), bytes.fromhex(chunk["sealed"]))
    assert opened.final and opened.error and opened.data == b"destination failed"


@pytest.mark.parametrize("case", load("reply.json")["must_reject"], ids=lambda c: c["name"])
def test_reply_rejects_vector(case: dict[str, Any]) -> None:
    key = bytes.fromhex(load("reply.json")["reply_key"])
    with pytest.raises(MalformedPacket) as err:
        open_reply(key, bytes.fromhex(case["chunk"]))
    assert err.value.reason.value == case["reason"]


@pytest.mark.parametrize("case", load("reply.json")["must_reject_frame"], ids=lambda c: c["name"])
def test_reply_frame_rejects_vector(case: dict[str, Any]) -> None:
    link_key = bytes.fromhex(load("reply.json")["client_link_key"])
    frame = bytes.fromhex(case["frame"])
    with pytest.raises(MalformedPacket) as err:
        check_frame_len(frame[:4])
        FrameReader(link_key).open(frame[4:])
    assert err.value.reason.value == case["reason"]
