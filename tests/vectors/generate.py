"""Generate the privacy protocol's test vectors (``docs/protocol.md`` §9) with fixed randomness.

Run ``python -m tests.vectors.generate`` from the repository root to rewrite ``tests/vectors/*.json``; the tests load
those files and also check that this script still reproduces them byte for byte.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from node.privacy import _gf256 as gf
from node.privacy._keys import OnionKey, keyring
from node.privacy._onion import Hop, PeeledExit, PeeledForward, build_onion, peel
from node.privacy._reply import (
    Envelope,
    FrameWriter,
    destination_layer_key,
    reply_link_key,
    seal_reply,
)
from node.privacy._sida import Clove, split
from node.privacy._x25519 import public_key

HERE = Path(__file__).parent
NOW = 1_800_000_000


class DetRandom:
    """A deterministic byte stream (SHA-256 in counter mode) that records every draw, for vectors only."""

    def __init__(self, label: str) -> None:
        self._label = label.encode()
        self._counter = 0
        self.draws: list[str] = []

    def __call__(self, size: int) -> bytes:
        out = b""
        while len(out) < size:
            out += hashlib.sha256(self._label + self._counter.to_bytes(8, "big")).digest()
            self._counter += 1
        self.draws.append(out[:size].hex())
        return out[:size]


def _flip(data: bytes, byte: int, bit: int = 0) -> bytes:
    mutable = bytearray(data)
    mutable[byte] ^= 1 << bit
    return bytes(mutable)


def gf256_vectors() -> dict[str, Any]:
    pairs = [(0, 7), (1, 0x53), (2, 0x80), (0x53, 0xCA), (0xFF, 0xFF), (0x1D, 0x02)]
    return {
        "polynomial": "0x11d",
        "products": [{"a": a, "b": b, "product": gf.mul(a, b)} for a, b in pairs],
        "inverses": [{"a": a, "inverse": gf.inv(a)} for a in (1, 2, 3, 0x53, 0x8E, 0xFF)],
    }


def sida_vectors() -> dict[str, Any]:
    cases: list[dict[str, Any]] = []
    for n, k, message in (
        (4, 3, b"PlanetServe S-IDA vector: any 3 of 4 cloves rebuild this."),
        (2, 2, b""),
        (5, 2, bytes(range(40))),
    ):
        rng = DetRandom(f"sida/{n}/{k}/{len(message)}")
        cloves = split(message, n, k, randbytes=rng)
        cases.append(
            {
                "n": n,
                "k": k,
                "message": message.hex(),
                "key": rng.draws[0],
                "nonce": rng.draws[1],
                "message_id": rng.draws[2],
                "coefficients": rng.draws[3],
                "cloves": [c.to_bytes().hex() for c in cloves],
            }
        )
    good = bytes.fromhex(cases[0]["cloves"][0])
    reject = [
        {"name": "truncated header", "clove": good[:84].hex(), "reason": "too_short"},
        {"name": "version 2", "clove": (b"\x02" + good[1:]).hex(), "reason": "bad_version"},
        {"name": "wrong type", "clove": (good[:1] + b"\x02" + good[2:]).hex(), "reason": "bad_type"},
        {"name": "k greater than n", "clove": (good[:3] + b"\x05" + good[4:]).hex(), "reason": "bad_field"},
        {"name": "index 0", "clove": (good[:4] + b"\x00" + good[5:]).hex(), "reason": "bad_field"},
        {"name": "fragment one byte short", "clove": good[:-1].hex(), "reason": "bad_length"},
        {
            "name": "ct_len over the maximum",
            "clove": (good[:21] + (2**20).to_bytes(4, "big") + good[25:]).hex(),
            "reason": "bad_length",
        },
    ]
    c0 = [bytes.fromhex(h) for h in cases[0]["cloves"]]
    combine_reject = [
        {
            "name": "flipped fragment bit",
            "cloves": [_flip(c0[0], 90).hex(), c0[1].hex(), c0[2].hex()],
            "reason": "bad_mac",
        },
        {
            "name": "flipped key-share bit",
            "cloves": [c0[0].hex(), _flip(c0[1], 60).hex(), c0[2].hex()],
            "reason": "bad_mac",
        },
        {
            "name": "flipped nonce bit in one clove",
            "cloves": [c0[0].hex(), c0[1].hex(), _flip(c0[2], 30).hex()],
            "reason": "inconsistent",
        },
        {
            "name": "tampered extra clove",
            "cloves": [c0[0].hex(), c0[1].hex(), c0[2].hex(), _flip(c0[3], 100).hex()],
            "reason": "inconsistent",
        },
    ]
    assert all(Clove.from_bytes(c).to_bytes() == c for c in c0)
    return {"cases": cases, "must_reject_parse": reject, "must_reject_combine": combine_reject}


#: Path lengths (hops, the destination included) with a vector case each (§9).
ONION_LENGTHS = (1, 2, 3, 4, 5, 6)


def onion_case(length: int) -> dict[str, Any]:
    """One path of ``length`` hops: every hop's inputs, derived keys and the packet it receives."""
    rng = DetRandom(f"onion/v2/{length}")
    node_secrets = [rng(32) for _ in range(length)]
    eph_secrets = [rng(32) for _ in range(length)]
    node_ids = [rng(20) for _ in range(length)]
    keys = [OnionKey(s) for s in node_secrets]
    path = [Hop(node_id=n, public_key=k.public) for n, k in zip(node_ids, keys, strict=True)]
    clove = f"clove bytes travel inside a {length}-hop onion".encode()
    pad = DetRandom(f"onion/v2/{length}/pad")
    built = build_onion(path, clove, ttl=60, now=NOW, ephemeral_secrets=eph_secrets, randbytes=pad)
    hops = []
    packet = built.packet
    for i, key in enumerate(keys):
        result = peel(packet, keyring(key), now=NOW)
        entry: dict[str, Any] = {
            "node_secret": key.secret.hex(),
            "node_public": key.public.hex(),
            "key_id": key.key_id.hex(),
            "node_id": node_ids[i].hex(),
            "ephemeral_secret": eph_secrets[i].hex(),
            "ephemeral_public": public_key(eph_secrets[i]).hex(),
            "packet_in": packet.hex(),
            "k_mac": result.keys.mac.hex(),
            "k_gcm": result.keys.gcm.hex(),
            "k_rho": result.keys.rho.hex(),
            "k_reply": result.keys.reply.hex(),
            "replay_tag": result.keys.replay_tag.hex(),
        }
        if isinstance(result, PeeledForward):
            entry["next_node"] = result.next_node.hex()
            entry["next_link_key"] = result.next_link_key.hex()
            packet = result.packet
        else:
            assert isinstance(result, PeeledExit)
            entry["exit_clove"] = result.clove.hex()
        hops.append(entry)
    return {
        "length": length,
        "expiry": built.expiry,
        "clove": clove.hex(),
        "routing_padding": pad.draws[0] if pad.draws else "",
        "hops": hops,
    }


def onion_vectors() -> dict[str, Any]:
    cases = [onion_case(m) for m in ONION_LENGTHS]
    first = bytes.fromhex(cases[3]["hops"][0]["packet_in"])  # the 4-hop path's first packet, read by its hop 0
    reject = [
        {"name": "one byte short", "packet": first[:-1].hex(), "reason": "too_short"},
        {"name": "one byte extra", "packet": (first + b"\x00").hex(), "reason": "bad_length"},
        {"name": "header only", "packet": first[:846].hex(), "reason": "too_short"},
        {"name": "over the maximum", "packet": (first + bytes(131_072)).hex(), "reason": "oversized"},
        {"name": "version 1", "packet": (b"\x01" + first[1:]).hex(), "reason": "bad_version"},
        {"name": "type clove", "packet": (first[:1] + b"\x01" + first[2:]).hex(), "reason": "bad_type"},
        {
            "name": "payload_len not a multiple of 256",
            "packet": (first[:842] + (257).to_bytes(4, "big") + first[846:]).hex(),
            "reason": "bad_length",
        },
        {
            "name": "payload_len disagrees with the packet length",
            "packet": (first[:842] + (512).to_bytes(4, "big") + first[846:]).hex(),
            "reason": "bad_length",
        },
        {"name": "unknown key id", "packet": _flip(first, 5).hex(), "reason": "unknown_key"},
        {"name": "low-order ephemeral key", "packet": (first[:10] + bytes(32) + first[42:]).hex(), "reason": "bad_key"},
        {"name": "flipped ephemeral key bit", "packet": _flip(first, 20).hex(), "reason": "bad_mac"},
        {"name": "flipped header MAC bit", "packet": _flip(first, 50).hex(), "reason": "bad_mac"},
        {"name": "flipped payload tag bit", "packet": _flip(first, 60).hex(), "reason": "bad_mac"},
        {"name": "flipped routing bit", "packet": _flip(first, 400).hex(), "reason": "bad_mac"},
        {"name": "flipped payload_len bit", "packet": _flip(first, 845, 7).hex(), "reason": "bad_length"},
        {"name": "flipped payload bit", "packet": _flip(first, 900).hex(), "reason": "bad_mac"},
    ]
    return {
        "version": 2,
        "now": NOW,
        "ttl": 60,
        "cases": cases,
        "must_reject": reject,
        "must_reject_hop": "cases[3].hops[0]",
        "expired_at": cases[3]["expiry"] + 1,
    }


def reply_vectors() -> dict[str, Any]:
    """§4 envelope, §6.1 chunks (data, FINAL, FINAL|ERROR) and §6.2 frames on every link of a 3-relay path."""
    rng = DetRandom("reply")
    reply_key = rng(32)
    envelope = Envelope(reply_key=reply_key, body=b'{"prompt": "hi"}')
    relay_keys = [rng(32) for _ in range(3)]  # k_reply of hops 0, 1, 2 (the relays)
    exit_k_reply = rng(32)  # k_reply of hop 3 (the destination): keys its link tags only
    clove_index = 2
    dest_layer = destination_layer_key(reply_key, clove_index)
    contents = ((b"Hello", False, False), (b", world" * 66, False, False), (b"", True, False))
    sealed = [
        seal_reply(reply_key, seq, data, final=final, error=error) for seq, (data, final, error) in enumerate(contents)
    ]
    error_chunk = seal_reply(reply_key, 3, b"destination failed", final=True, error=True)
    # Frames as they leave each hop, destination first (hop 3), then relays 2, 1, 0 (the last is what the client reads).
    writers = [FrameWriter(layer_key=dest_layer, link_key=reply_link_key(exit_k_reply))]
    writers += [FrameWriter.for_hop(k) for k in reversed(relay_keys)]
    links: list[list[str]] = []
    bodies = sealed
    for writer in writers:
        frames = [writer.seal(body) for body in bodies]
        links.append([f.hex() for f in frames])
        bodies = [f[4:-16] for f in frames]
    chunks = [
        {"seq": seq, "data": data.hex(), "final": final, "error": error, "sealed": sealed[seq].hex()}
        for seq, (data, final, error) in enumerate(contents)
    ]
    chunks.append(
        {"seq": 3, "data": b"destination failed".hex(), "final": True, "error": True, "sealed": error_chunk.hex()}
    )
    s0 = sealed[0]
    frame0 = bytes.fromhex(links[-1][0])
    client_link_key = reply_link_key(relay_keys[0])
    return {
        "reply_key": reply_key.hex(),
        "envelope": envelope.to_bytes().hex(),
        "envelope_body": envelope.body.hex(),
        "clove_index": clove_index,
        "destination_layer_key": dest_layer.hex(),
        "destination_k_reply": exit_k_reply.hex(),
        "relay_k_reply": [k.hex() for k in relay_keys],
        "link_keys": {
            "hop3_destination": reply_link_key(exit_k_reply).hex(),
            **{f"hop{i}": reply_link_key(k).hex() for i, k in enumerate(relay_keys)},
        },
        "chunks": chunks,
        "frames_by_link": {
            "hop3_to_hop2": links[0],
            "hop2_to_hop1": links[1],
            "hop1_to_hop0": links[2],
            "hop0_to_client": links[3],
        },
        "must_reject": [
            {"name": "flipped seq", "chunk": _flip(s0, 5).hex(), "reason": "bad_mac"},
            {"name": "flipped ciphertext", "chunk": _flip(s0, 20).hex(), "reason": "bad_mac"},
            {"name": "flipped tag", "chunk": _flip(s0, len(s0) - 1).hex(), "reason": "bad_mac"},
            {"name": "unknown flag", "chunk": (s0[:6] + b"\x04" + s0[7:]).hex(), "reason": "bad_field"},
            {"name": "error without final", "chunk": (s0[:6] + b"\x02" + s0[7:]).hex(), "reason": "bad_field"},
            {
                "name": "unknown flag and bad MAC: flags first",
                "chunk": _flip(s0[:6] + b"\x80" + s0[7:], 20).hex(),
                "reason": "bad_field",
            },
            {"name": "version 2", "chunk": (b"\x02" + s0[1:]).hex(), "reason": "bad_version"},
            {"name": "type onion", "chunk": (s0[:1] + b"\x02" + s0[2:]).hex(), "reason": "bad_type"},
            {"name": "truncated", "chunk": s0[:40].hex(), "reason": "bad_length"},
            {"name": "one byte long", "chunk": (s0 + b"\x00").hex(), "reason": "bad_length"},
            {"name": "old variable-length chunk", "chunk": s0[: 7 + 64 + 16].hex(), "reason": "bad_length"},
        ],
        "client_link_key": client_link_key.hex(),
        "must_reject_frame": [
            {
                "name": "length prefix 507",
                "frame": ((507).to_bytes(4, "big") + frame0[4:]).hex(),
                "reason": "bad_length",
            },
            {"name": "flipped body bit", "frame": _flip(frame0, 100).hex(), "reason": "bad_mac"},
            {"name": "flipped link tag bit", "frame": _flip(frame0, len(frame0) - 1).hex(), "reason": "bad_mac"},
            {"name": "frame 1 in place of frame 0", "frame": links[-1][1], "reason": "bad_mac"},
        ],
    }


def build_all() -> dict[str, dict[str, Any]]:
    """Every vector file's content, by file name."""
    return {
        "gf256.json": gf256_vectors(),
        "sida.json": sida_vectors(),
        "onion.json": onion_vectors(),
        "reply.json": reply_vectors(),
    }


def render(content: dict[str, Any]) -> str:
    """The canonical JSON text of a vector file."""
    return json.dumps(content, indent=1, sort_keys=True) + "\n"


def main() -> None:
    for name, content in build_all().items():
        (HERE / name).write_text(render(content))


if __name__ == "__main__":
    main()
