"""Sphinx-like onion packets: fixed-size headers, per-hop X25519 + HKDF + AES-GCM (``docs/protocol.md`` §5).

Pure and synchronous. :func:`build_onion` wraps a clove for a path; :func:`peel` removes one layer at a hop and
returns either the packet for the next hop or, at the destination, the clove. Every length is checked before any
cryptography.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from node.privacy._aes import AuthenticationFailed, ctr_keystream, gcm_open, gcm_seal, xor_bytes
from node.privacy._constants import (
    ADDR_MAX,
    EXPIRY_GRANULARITY,
    HOP_EXIT,
    HOP_FORWARD,
    MAX_HOPS,
    MAX_PACKET,
    MAX_PAYLOAD,
    MAX_TTL,
    ONION_HEADER_LEN,
    ONION_KDF_INFO,
    ONION_OKM_LEN,
    PAYLOAD_QUANTUM,
    ROUTING_LEN,
    SLOT_LEN,
    TYPE_ONION,
    VERSION,
)
from node.privacy._errors import InvalidPrivacyParam, MalformedPacket, RejectReason
from node.privacy._sida import RandBytes
from node.privacy._x25519 import public_key as x25519_public_key
from node.privacy._x25519 import x25519

_SLOT = struct.Struct(">BIB64s32s16s10s")
assert _SLOT.size == SLOT_LEN
_ZERO12 = bytes(12)
_ZERO8 = bytes(8)
_ALLOWED_ADDR = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-:/[]_")


@dataclass(frozen=True, slots=True)
class Hop:
    """One hop of a path as the sender sees it."""

    address: str
    """Where the previous hop sends the packet: ASCII ``http://host:port``, at most 64 bytes."""
    public_key: bytes = field(repr=False)
    """The hop's raw 32-byte X25519 public key (as registered on chain)."""


@dataclass(frozen=True, slots=True)
class HopKeys:
    """The keys one hop derives from its shared secret (§5.3). Secret: never printed."""

    gcm: bytes = field(repr=False)
    rho: bytes = field(repr=False)
    reply: bytes = field(repr=False)
    replay_tag: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class BuiltOnion:
    """A packet ready for its first hop, and what the sender keeps to read replies."""

    first_hop: str
    """Address of hop 0."""
    packet: bytes = field(repr=False)
    """The §5.1 packet for hop 0."""
    relay_reply_keys: tuple[bytes, ...] = field(repr=False)
    """``k_reply`` of hops ``0..m-2`` (the relays), to strip their reply layers (§6.2)."""
    expiry: int
    """Unix seconds after which every hop drops the packet."""


@dataclass(frozen=True, slots=True)
class PeeledForward:
    """A relay's view after peeling: where to send what."""

    next_hop: str
    """ASCII address of the next hop."""
    packet: bytes = field(repr=False)
    """The packet for the next hop (same length as the one received)."""
    keys: HopKeys
    """This hop's keys (the reply layer and the replay tag)."""
    expiry: int
    """Unix seconds."""


@dataclass(frozen=True, slots=True)
class PeeledExit:
    """The destination's view after peeling: the clove."""

    clove: bytes = field(repr=False)
    """The clove bytes (§3)."""
    keys: HopKeys
    """This hop's keys (the replay tag)."""
    expiry: int
    """Unix seconds."""


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 HKDF with SHA-256 (stdlib ``hmac``: about 50x faster than pycryptodome's, same output)."""
    prk = hmac.digest(salt or bytes(32), ikm, hashlib.sha256)
    okm = b""
    block = b""
    counter = 1
    while len(okm) < length:
        block = hmac.digest(prk, block + info + bytes((counter,)), hashlib.sha256)
        okm += block
        counter += 1
    return okm[:length]


def derive_hop_keys(shared: bytes, eph_pub: bytes, node_pub: bytes) -> HopKeys:
    """§5.3: split ``HKDF-SHA256(ss, "", info || eph_pub || node_pub)`` into the hop's keys."""
    okm = hkdf_sha256(shared, b"", ONION_KDF_INFO + eph_pub + node_pub, ONION_OKM_LEN)
    return HopKeys(gcm=okm[0:32], rho=okm[32:64], reply=okm[64:96], replay_tag=okm[96:112])


def _check_address(addr: bytes) -> str:
    if not addr.startswith(b"http://") or len(addr) > ADDR_MAX or not set(addr) <= _ALLOWED_ADDR:
        raise MalformedPacket(RejectReason.BAD_SLOT, "next-hop address")
    return addr.decode("ascii")


def _aad(eph_pub: bytes, routing: bytes, payload_len: int) -> bytes:
    return bytes((VERSION, TYPE_ONION)) + eph_pub + routing + payload_len.to_bytes(4, "big")


def padded_payload_len(clove_len: int) -> int:
    """The §5.1 payload size that carries a clove of ``clove_len`` bytes."""
    return max(PAYLOAD_QUANTUM, math.ceil((4 + clove_len) / PAYLOAD_QUANTUM) * PAYLOAD_QUANTUM)


def build_onion(
    path: Sequence[Hop],
    clove: bytes,
    *,
    ttl: int = 60,
    now: float | None = None,
    ephemeral_secrets: Sequence[bytes] | None = None,
    randbytes: RandBytes | None = None,
) -> BuiltOnion:
    """Wrap ``clove`` for ``path`` (relays, then the destination last), per §5.5.

    ``ephemeral_secrets`` and ``randbytes`` exist only for the test-vector generator; leave them ``None``.
    """
    m = len(path)
    if not (1 <= m <= MAX_HOPS):
        raise InvalidPrivacyParam("len(path)", m, f"1..{MAX_HOPS} hops (relays, then the destination)")
    if not (1 <= ttl <= MAX_TTL):
        raise InvalidPrivacyParam("ttl", ttl, f"1..{MAX_TTL} seconds")
    payload_len = padded_payload_len(len(clove))
    if payload_len > MAX_PAYLOAD:
        raise InvalidPrivacyParam("len(clove)", len(clove), f"at most {MAX_PAYLOAD - 4} bytes")
    for hop in path:
        try:
            _check_address(hop.address.encode("ascii", "replace"))
        except MalformedPacket as exc:
            raise InvalidPrivacyParam("address", hop.address, "ASCII http://host:port, at most 64 bytes") from exc
        if len(hop.public_key) != 32:
            raise InvalidPrivacyParam("public_key", len(hop.public_key), "32 bytes")
    rand = randbytes or secrets.token_bytes
    if ephemeral_secrets is None:
        ephemeral_secrets = [secrets.token_bytes(32) for _ in range(m)]
    if len(ephemeral_secrets) != m:
        raise InvalidPrivacyParam("ephemeral_secrets", len(ephemeral_secrets), f"{m} secrets")
    current = time.time() if now is None else now
    expiry = math.ceil((current + ttl) / EXPIRY_GRANULARITY) * EXPIRY_GRANULARITY

    eph_pubs = [x25519_public_key(e) for e in ephemeral_secrets]
    keys = [
        derive_hop_keys(x25519(e, hop.public_key), eph, hop.public_key)
        for e, eph, hop in zip(ephemeral_secrets, eph_pubs, path, strict=True)
    ]
    streams = [ctr_keystream(k.rho, _ZERO8, ROUTING_LEN + SLOT_LEN) for k in keys]

    filler = b""
    for i in range(m - 1):
        filler = xor_bytes(filler + bytes(SLOT_LEN), streams[i][ROUTING_LEN - i * SLOT_LEN : ROUTING_LEN + SLOT_LEN])

    inner = len(clove).to_bytes(4, "big") + clove
    inner += bytes(payload_len - len(inner))

    routing = b""
    tag = b""
    for i in range(m - 1, -1, -1):
        if i == m - 1:
            slot = _SLOT.pack(HOP_EXIT, expiry, 0, b"", b"", b"", b"")
            head = slot + rand(ROUTING_LEN - m * SLOT_LEN)
            routing = xor_bytes(head, streams[i][: len(head)]) + filler
        else:
            addr = path[i + 1].address.encode("ascii")
            slot = _SLOT.pack(HOP_FORWARD, expiry, len(addr), addr, eph_pubs[i + 1], tag, b"")
            routing = xor_bytes(slot + routing[: ROUTING_LEN - SLOT_LEN], streams[i][:ROUTING_LEN])
        inner, tag = gcm_seal(keys[i].gcm, _ZERO12, _aad(eph_pubs[i], routing, payload_len), inner)
    packet = bytes((VERSION, TYPE_ONION)) + eph_pubs[0] + tag + routing + payload_len.to_bytes(4, "big") + inner
    assert len(packet) == ONION_HEADER_LEN + payload_len
    return BuiltOnion(
        first_hop=path[0].address,
        packet=packet,
        relay_reply_keys=tuple(k.reply for k in keys[:-1]),
        expiry=expiry,
    )


def check_onion_framing(packet: bytes) -> int:
    """§5.4 step 1: lengths, version and type, before any crypto. Returns ``payload_len``."""
    if len(packet) > MAX_PACKET:
        raise MalformedPacket(RejectReason.OVERSIZED)
    if len(packet) < ONION_HEADER_LEN + PAYLOAD_QUANTUM:
        raise MalformedPacket(RejectReason.TOO_SHORT, "onion packet")
    if packet[0] != VERSION:
        raise MalformedPacket(RejectReason.BAD_VERSION)
    if packet[1] != TYPE_ONION:
        raise MalformedPacket(RejectReason.BAD_TYPE)
    payload_len = int.from_bytes(packet[ONION_HEADER_LEN - 4 : ONION_HEADER_LEN], "big")
    if payload_len == 0 or payload_len % PAYLOAD_QUANTUM or payload_len > MAX_PAYLOAD:
        raise MalformedPacket(RejectReason.BAD_LENGTH, "payload_len")
    if len(packet) != ONION_HEADER_LEN + payload_len:
        raise MalformedPacket(RejectReason.BAD_LENGTH, "packet length does not match payload_len")
    return payload_len


def peel(
    packet: bytes, node_secret: bytes, node_public: bytes, *, now: float | None = None
) -> PeeledForward | PeeledExit:
    """Remove this hop's layer (§5.4). Raises ``MalformedPacket`` with the reason on any failure.

    Replay detection is the caller's (it owns the cache): check ``keys.replay_tag`` after this returns.
    """
    payload_len = check_onion_framing(packet)
    eph_pub = packet[2:34]
    tag = packet[34:50]
    routing = packet[50 : 50 + ROUTING_LEN]
    payload = packet[ONION_HEADER_LEN:]
    keys = derive_hop_keys(x25519(node_secret, eph_pub), eph_pub, node_public)
    try:
        inner = gcm_open(keys.gcm, _ZERO12, _aad(eph_pub, routing, payload_len), payload, tag)
    except AuthenticationFailed as exc:
        raise MalformedPacket(RejectReason.BAD_MAC, "onion layer authentication failed") from exc
    dec = xor_bytes(routing + bytes(SLOT_LEN), ctr_keystream(keys.rho, _ZERO8, ROUTING_LEN + SLOT_LEN))
    hop_type, expiry, addr_len, addr, next_eph, next_tag, pad = _SLOT.unpack_from(dec)
    if any(pad):
        raise MalformedPacket(RejectReason.BAD_SLOT, "slot padding")
    current = time.time() if now is None else now
    if expiry < current or expiry > current + MAX_TTL + EXPIRY_GRANULARITY:
        raise MalformedPacket(RejectReason.EXPIRED)
    if hop_type == HOP_EXIT:
        if addr_len or any(addr) or any(next_eph) or any(next_tag):
            raise MalformedPacket(RejectReason.BAD_SLOT, "exit slot fields")
        clove_len = int.from_bytes(inner[:4], "big")
        if 4 + clove_len > payload_len:
            raise MalformedPacket(RejectReason.BAD_PAYLOAD, "clove_len")
        if any(inner[4 + clove_len :]):
            raise MalformedPacket(RejectReason.BAD_PAYLOAD, "payload padding")
        return PeeledExit(clove=bytes(inner[4 : 4 + clove_len]), keys=keys, expiry=expiry)
    if hop_type != HOP_FORWARD:
        raise MalformedPacket(RejectReason.BAD_SLOT, "hop type")
    if not (1 <= addr_len <= ADDR_MAX) or any(addr[addr_len:]):
        raise MalformedPacket(RejectReason.BAD_SLOT, "address length")
    next_hop = _check_address(addr[:addr_len])
    next_packet = (
        bytes((VERSION, TYPE_ONION)) + next_eph + next_tag + dec[SLOT_LEN:] + payload_len.to_bytes(4, "big") + inner
    )
    return PeeledForward(next_hop=next_hop, packet=next_packet, keys=keys, expiry=expiry)
