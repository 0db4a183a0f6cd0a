"""The onion vectors (§5, ``tests/vectors/onion.json``) are reproduced by an implementation written from the spec
alone (``tests/independent/onion.py``), and ``node.privacy`` and that implementation accept each other's packets."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

import pytest

from node.privacy import Hop, MalformedPacket, OnionKey, PeeledExit, PeeledForward, build_onion, keyring, peel
from tests.independent import onion as ind

VECTORS = Path(__file__).parent / "vectors"
ONION: dict[str, Any] = json.loads((VECTORS / "onion.json").read_text())


def _h(value: str) -> bytes:
    return bytes.fromhex(value)


class _Draws:
    """Hands out one recorded byte string (the §5.5 ``R``), checking the size asked for."""

    def __init__(self, recorded: str) -> None:
        self._recorded = _h(recorded)

    def __call__(self, size: int) -> bytes:
        assert len(self._recorded) == size
        return self._recorded


@pytest.mark.parametrize("case", ONION["cases"], ids=lambda c: f"m{c['length']}")
def test_independent_writer_reproduces_the_vector_packet(case: dict[str, Any]) -> None:
    hops = case["hops"]
    built = ind.build(
        [(_h(h["node_id"]), _h(h["node_public"])) for h in hops],
        _h(case["clove"]),
        now=ONION["now"],
        ttl=ONION["ttl"],
        ephemeral_secrets=[_h(h["ephemeral_secret"]) for h in hops],
        randbytes=_Draws(case["routing_padding"]),
    )
    assert built.expiry == case["expiry"]
    assert built.packet.hex() == hops[0]["packet_in"]
    assert [k.k_reply.hex() for k in built.keys] == [h["k_reply"] for h in hops]


@pytest.mark.parametrize("case", ONION["cases"], ids=lambda c: f"m{c['length']}")
def test_independent_reader_peels_every_hop_of_the_vector(case: dict[str, Any]) -> None:
    hops = case["hops"]
    packet = _h(hops[0]["packet_in"])
    for i, hop in enumerate(hops):
        assert packet.hex() == hop["packet_in"]
        assert ind.key_id(_h(hop["node_public"])).hex() == hop["key_id"]
        result = ind.peel(packet, {_h(hop["key_id"]): _h(hop["node_secret"])}, now=ONION["now"])
        keys = result.keys
        assert (keys.k_mac.hex(), keys.k_gcm.hex(), keys.k_rho.hex(), keys.k_reply.hex(), keys.replay_tag.hex()) == (
            hop["k_mac"],
            hop["k_gcm"],
            hop["k_rho"],
            hop["k_reply"],
            hop["replay_tag"],
        )
        assert result.expiry == case["expiry"]
        if i < len(hops) - 1:
            assert isinstance(result, ind.Forward)
            assert result.next_node.hex() == hop["next_node"] == hops[i + 1]["node_id"]
            assert result.next_link_key.hex() == hop["next_link_key"]
            # §6.2: the slot carries the next hop's link key, derived from that hop's own k_reply.
            assert result.next_link_key == ind.hkdf(_h(hops[i + 1]["k_reply"]), b"", ind.LINK_INFO, 16)
            packet = result.packet
        else:
            assert isinstance(result, ind.Exit)
            assert result.clove.hex() == hop["exit_clove"] == case["clove"]


@pytest.mark.parametrize("reject", ONION["must_reject"], ids=lambda r: r["name"])
def test_independent_reader_rejects_each_vector_packet_with_its_reason(reject: dict[str, Any]) -> None:
    assert ONION["must_reject_hop"] == "cases[3].hops[0]"
    hop = ONION["cases"][3]["hops"][0]
    with pytest.raises(ind.Reject) as caught:
        ind.peel(_h(reject["packet"]), {_h(hop["key_id"]): _h(hop["node_secret"])}, now=ONION["now"])
    assert caught.value.reason == reject["reason"]


def test_independent_reader_rejects_the_vector_packet_once_expired_and_when_replayed() -> None:
    hop = ONION["cases"][3]["hops"][0]
    secrets_ = {_h(hop["key_id"]): _h(hop["node_secret"])}
    packet = _h(hop["packet_in"])
    with pytest.raises(ind.Reject, match="expired"):
        ind.peel(packet, secrets_, now=ONION["expired_at"])
    # Step 5 before step 7: a replay of an expired packet says "replay" (the tag is known before the slot is read).
    tag = _h(hop["replay_tag"])
    with pytest.raises(ind.Reject, match="replay"):
        ind.peel(packet, secrets_, now=ONION["expired_at"], seen=lambda t: t == tag)


def _path(m: int) -> tuple[list[OnionKey], list[Hop]]:
    keys = [OnionKey(secrets.token_bytes(32)) for _ in range(m)]
    return keys, [Hop(node_id=secrets.token_bytes(20), public_key=k.public) for k in keys]


@pytest.mark.parametrize("m", [1, 2, 4, 6])
@pytest.mark.parametrize("payload_len", [None, 4096])
def test_node_privacy_peels_packets_the_independent_writer_builds(m: int, payload_len: int | None) -> None:
    keys, hops = _path(m)
    clove = secrets.token_bytes(300)
    now = time.time()
    built = ind.build(
        [(h.node_id, h.public_key) for h in hops],
        clove,
        now=now,
        ttl=30,
        ephemeral_secrets=[secrets.token_bytes(32) for _ in range(m)],
        randbytes=secrets.token_bytes,
        payload_len=payload_len,
    )
    packet = built.packet
    for i, key in enumerate(keys):
        result = peel(packet, keyring(key), now=now)
        assert result.keys.reply == built.keys[i].k_reply
        if i < m - 1:
            assert isinstance(result, PeeledForward)
            assert result.next_node == hops[i + 1].node_id
            assert result.next_link_key == built.keys[i + 1].link_key
            packet = result.packet
        else:
            assert isinstance(result, PeeledExit)
            assert result.clove == clove


@pytest.mark.parametrize("m", [1, 3, 6])
@pytest.mark.parametrize("payload_len", [None, 16_384])
def test_independent_reader_peels_packets_build_onion_builds(m: int, payload_len: int | None) -> None:
    keys, hops = _path(m)
    clove = secrets.token_bytes(700)
    now = time.time()
    built = build_onion(hops, clove, ttl=45, now=now, payload_len=payload_len)
    packet = built.packet
    assert len(packet) == ind.HEADER_LEN + (payload_len or 768)
    for i, key in enumerate(keys):
        result = ind.peel(packet, {key.key_id: key.secret}, now=now)
        assert result.keys.k_reply == built.reply_keys[i]
        assert result.expiry == built.expiry
        if i < m - 1:
            assert isinstance(result, ind.Forward)
            assert result.next_node == hops[i + 1].node_id
            packet = result.packet
        else:
            assert isinstance(result, ind.Exit)
            assert result.clove == clove


def test_both_readers_give_the_same_reason_for_the_same_tampering() -> None:
    """Each header byte flipped in turn (a sample of offsets in every field) gets one reason from both readers."""
    keys, hops = _path(3)
    now = time.time()
    packet = build_onion(hops, b"x" * 100, ttl=30, now=now).packet
    for offset in (0, 1, 2, 9, 10, 41, 42, 57, 58, 73, 74, 500, 841, 842, 845, 846, len(packet) - 1):
        bad = bytearray(packet)
        bad[offset] ^= 0x01
        with pytest.raises(ind.Reject) as independent:
            ind.peel(bytes(bad), {keys[0].key_id: keys[0].secret}, now=now)
        with pytest.raises(MalformedPacket) as ours:
            peel(bytes(bad), keyring(keys[0]), now=now)
        assert ours.value.reason.value == independent.value.reason, offset
