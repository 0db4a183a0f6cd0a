"""The S-IDA (§3) and reply (§6) vectors are reproduced by an implementation written from the spec alone, and
``node.privacy`` and that implementation accept each other's output."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import pytest

from node.privacy import Clove, MalformedPacket, combine, open_reply, seal_reply, split
from node.privacy._reply import FrameReader, FrameWriter, destination_layer_key, reply_link_key, strip_reply_layers
from tests.independent import reply_sida as ind

VECTORS = Path(__file__).parent / "vectors"


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / name).read_text())
    return data


class Replay:
    """Hands out the recorded draws of a vector case, in order (the independent writer draws like §3.2 says)."""

    def __init__(self, draws: list[str]) -> None:
        self._draws = [bytes.fromhex(d) for d in draws]

    def __call__(self, size: int) -> bytes:
        out = self._draws.pop(0)
        assert len(out) == size
        return out


@pytest.mark.parametrize("case", load("sida.json")["cases"], ids=lambda c: f"n{c['n']}k{c['k']}")
def test_independent_split_reproduces_the_vector_cloves(case: dict[str, Any]) -> None:
    draws = [case["key"], case["nonce"], case["message_id"], case["coefficients"]]
    cloves = ind.sida_split(bytes.fromhex(case["message"]), case["n"], case["k"], Replay(draws))
    assert [c.hex() for c in cloves] == case["cloves"]


@pytest.mark.parametrize("case", load("sida.json")["cases"], ids=lambda c: f"n{c['n']}k{c['k']}")
def test_independent_combine_rebuilds_the_vector_message_from_any_k(case: dict[str, Any]) -> None:
    cloves = [bytes.fromhex(c) for c in case["cloves"]]
    k = case["k"]
    assert ind.sida_combine(cloves[-k:]) == bytes.fromhex(case["message"])
    assert ind.sida_combine(cloves) == bytes.fromhex(case["message"])


@pytest.mark.parametrize("case", load("sida.json")["must_reject_parse"], ids=lambda c: c["name"])
def test_independent_clove_reader_rejects_like_the_vectors(case: dict[str, Any]) -> None:
    with pytest.raises(ind.Reject) as err:
        ind.parse_clove(bytes.fromhex(case["clove"]))
    assert err.value.reason == case["reason"]


@pytest.mark.parametrize("case", load("sida.json")["must_reject_combine"], ids=lambda c: c["name"])
def test_independent_combine_rejects_like_the_vectors(case: dict[str, Any]) -> None:
    with pytest.raises(ind.Reject) as err:
        ind.sida_combine([bytes.fromhex(c) for c in case["cloves"]])
    assert err.value.reason == case["reason"]


def test_node_and_independent_sida_accept_each_others_cloves() -> None:
    message = secrets.token_bytes(777)
    theirs = ind.sida_split(message, 5, 3, secrets.token_bytes)
    assert combine(Clove.from_bytes(c) for c in theirs[1:4]) == message
    ours = [c.to_bytes() for c in split(message, 5, 3)]
    assert ind.sida_combine([ours[0], ours[2], ours[4]]) == message


def test_independent_reply_reproduces_every_vector_chunk_and_frame() -> None:
    v = load("reply.json")
    key = bytes.fromhex(v["reply_key"])
    for chunk in v["chunks"]:
        sealed = ind.seal_chunk(key, chunk["seq"], bytes.fromhex(chunk["data"]), chunk["final"], chunk["error"])
        assert sealed.hex() == chunk["sealed"]
    relays = [bytes.fromhex(k) for k in v["relay_k_reply"]]
    dest_layer = ind.destination_layer_key(key, v["clove_index"])
    assert dest_layer.hex() == v["destination_layer_key"]
    senders = [(dest_layer, ind.link_key(bytes.fromhex(v["destination_k_reply"])))]
    senders += [(k, ind.link_key(k)) for k in reversed(relays)]
    bodies = [bytes.fromhex(c["sealed"]) for c in v["chunks"][:3]]
    for (layer, link), name in zip(
        senders, ("hop3_to_hop2", "hop2_to_hop1", "hop1_to_hop0", "hop0_to_client"), strict=True
    ):
        frames = [ind.send_frame(layer, link, j, body) for j, body in enumerate(bodies)]
        assert [f.hex() for f in frames] == v["frames_by_link"][name], name
        bodies = [ind.receive_frame(link, j, f) for j, f in enumerate(frames)]
    layers = [*relays, dest_layer]
    client_link = ind.link_key(relays[0])
    for j, frame in enumerate(bytes.fromhex(f) for f in v["frames_by_link"]["hop0_to_client"]):
        seq, data, final, error = ind.open_chunk(
            key, ind.strip_layers(layers, j, ind.receive_frame(client_link, j, frame))
        )
        assert (seq, data.hex(), final, error) == tuple(v["chunks"][j][f] for f in ("seq", "data", "final", "error"))


@pytest.mark.parametrize("case", load("reply.json")["must_reject"], ids=lambda c: c["name"])
def test_independent_chunk_reader_rejects_like_the_vectors(case: dict[str, Any]) -> None:
    with pytest.raises(ind.Reject) as err:
        ind.open_chunk(bytes.fromhex(load("reply.json")["reply_key"]), bytes.fromhex(case["chunk"]))
    assert err.value.reason == case["reason"]


@pytest.mark.parametrize("case", load("reply.json")["must_reject_frame"], ids=lambda c: c["name"])
def test_independent_frame_reader_rejects_like_the_vectors(case: dict[str, Any]) -> None:
    with pytest.raises(ind.Reject) as err:
        ind.receive_frame(bytes.fromhex(load("reply.json")["client_link_key"]), 0, bytes.fromhex(case["frame"]))
    assert err.value.reason == case["reason"]


def test_node_and_independent_reply_paths_accept_each_others_frames() -> None:
    key = secrets.token_bytes(32)
    relay = secrets.token_bytes(32)
    dest_k_reply = secrets.token_bytes(32)
    # Independent destination -> node relay -> independent client.
    chunk = ind.seal_chunk(key, 0, b"from the spec", True, False)
    frame = ind.send_frame(ind.destination_layer_key(key, 1), ind.link_key(dest_k_reply), 0, chunk)
    relayed = FrameWriter.for_hop(relay).seal(FrameReader(reply_link_key(dest_k_reply)).open(frame[4:]))
    body = ind.receive_frame(ind.link_key(relay), 0, relayed)
    assert ind.open_chunk(key, ind.strip_layers([relay, ind.destination_layer_key(key, 1)], 0, body))[1] == (
        b"from the spec"
    )
    # Node destination -> independent relay -> node client.
    ours = FrameWriter(layer_key=destination_layer_key(key, 3), link_key=reply_link_key(dest_k_reply)).seal(
        seal_reply(key, 7, b"from node", final=True, error=True)
    )
    hop = ind.receive_frame(ind.link_key(dest_k_reply), 0, ours)
    theirs = ind.send_frame(relay, ind.link_key(relay), 0, hop)
    opened = open_reply(
        key,
        strip_reply_layers(
            (relay, destination_layer_key(key, 3)), 0, FrameReader(reply_link_key(relay)).open(theirs[4:])
        ),
    )
    assert (opened.seq, opened.data, opened.final, opened.error) == (7, b"from node", True, True)


def test_a_frame_tampered_between_two_hops_is_refused_by_the_next_hop() -> None:
    k_reply = secrets.token_bytes(32)
    frame = bytearray(FrameWriter.for_hop(k_reply).seal(seal_reply(secrets.token_bytes(32), 0, b"x")))
    frame[200] ^= 0x01
    with pytest.raises(MalformedPacket) as err:
        FrameReader(reply_link_key(k_reply)).open(bytes(frame[4:]))
    assert err.value.reason.value == "bad_mac"
