"""Sphinx-like onion packets, version 2: fixed-size headers naming the recipient key, a header MAC checked before any
payload work, next hops named by registry id, per-hop X25519 + HKDF + AES-GCM (``docs/protocol.md`` §5).

Pure and synchronous. :func:`build_onion` wraps a clove for a path; :func:`peel` removes one layer at a hop and
returns either the packet for the next hop or, at the destination, the clove. The reader's checks run in the order of
§5.4, cheapest first, so that junk is dropped after a dictionary lookup (unknown key id) or one X25519 and one HMAC
over the header (bad header MAC), never after decrypting a payload of up to 128 KiB.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from node.privacy._aes import AuthenticationFailed, ctr_keystream, gcm_open, gcm_seal, xor_bytes
from node.privacy._constants import (
    EXPIRY_GRANULARITY,
    HEADER_MAC_LEN,
    HOP_EXIT,
    HOP_FORWARD,
    MAX_HOPS,
    MAX_PACKET,
    MAX_PAYLOAD,
    MAX_TTL,
    NODE_ID_LEN,
    OFF_EPH_PUB,
    OFF_HEADER_MAC,
    OFF_KEY_ID,
    OFF_PAYLOAD_LEN,
    OFF_PAYLOAD_TAG,
    OFF_ROUTING,
    ONION_HEADER_LEN,
    ONION_KDF_INFO,
    ONION_OKM_LEN,
    ONION_VERSION,
    PAYLOAD_QUANTUM,
    ROUTING_LEN,
    SLOT_LEN,
    TYPE_ONION,
)
from node.privacy._errors import InvalidPrivacyParam, MalformedPacket, RejectReason
from node.privacy._keys import OnionKeyring, key_id
from node.privacy._sida import RandBytes
from node.privacy._x25519 import exchange, private_key, raw_public_key

#: §5.2: hop_type, expiry, next_node, next_key_id, next_eph_pub, next_header_mac, next_tag, next_link_key, padding.
_SLOT = struct.Struct(">BI20s8s32s16s16s16s15s")
#: §6.2: label of a hop's reply link key, ``HKDF(k_reply, "", label, 16)`` (the same as ``_reply.reply_link_key``).
_REPLY_LINK_INFO = b"planetserve/v1/reply-link"
assert _SLOT.size == SLOT_LEN
_ZERO12 = bytes(12)
_ZERO8 = bytes(8)
_PREFIX = bytes((ONION_VERSION, TYPE_ONION))


@dataclass(frozen=True, slots=True)
class Hop:
    """One hop of a path as the sender sees it."""

    node_id: bytes
    """The hop's 20-byte registry id (its operator's Ethereum address): how the previous hop names it (§5.2)."""
    public_key: bytes = field(repr=False)
    """The hop's raw 32-byte X25519 onion public key (as registered on chain)."""

    def __post_init__(self) -> None:
        if len(self.node_id) != NODE_ID_LEN or not any(self.node_id):
            raise InvalidPrivacyParam("node_id", len(self.node_id), f"{NODE_ID_LEN} bytes, not all zero")
        if len(self.public_key) != 32:
            raise InvalidPrivacyParam("public_key", len(self.public_key), "32 bytes")


@dataclass(frozen=True, slots=True)
class HopKeys:
    """The keys one hop derives from its shared secret (§5.3). Secret: never printed."""

    mac: bytes = field(repr=False)
    gcm: bytes = field(repr=False)
    rho: bytes = field(repr=False)
    reply: bytes = field(repr=False)
    replay_tag: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class BuiltOnion:
    """A packet ready for its first hop, and what the sender keeps to read replies."""

    first_node: bytes
    """Registry id of hop 0 (the sender looks its endpoint up itself)."""
    packet: bytes = field(repr=False)
    """The §5.1 packet for hop 0."""
    relay_reply_keys: tuple[bytes, ...] = field(repr=False)
    """``k_reply`` of hops ``0..m-2`` (the relays), to strip their reply layers (§6.2)."""
    reply_keys: tuple[bytes, ...] = field(repr=False)
    """``k_reply`` of every hop ``0..m-1``, the destination last (§6.2)."""
    expiry: int
    """Unix seconds after which every hop drops the packet."""


@dataclass(frozen=True, slots=True)
class PeeledForward:
    """A relay's view after peeling: to which registered node to send what."""

    next_node: bytes
    """The next hop's 20-byte registry id; the relay resolves it in its own view of the registry (§5.4 step 8)."""
    packet: bytes = field(repr=False)
    """The packet for the next hop (same length as the one received)."""
    keys: HopKeys
    """This hop's keys (the reply layer and the replay tag)."""
    expiry: int
    """Unix seconds."""
    next_link_key: bytes = field(repr=False)
    """The next hop's 16-byte reply link key (§6.2): what this hop checks the reply frames it receives with."""


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
    """RFC 5869 HKDF with SHA-256 through ``cryptography`` (about 5 µs for 144 bytes here, against about 12 µs for
    the same construction on stdlib ``hmac``). An empty ``salt`` means ``HashLen`` zero bytes, as the RFC says."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt or None, info=info).derive(ikm)


def derive_hop_keys(shared: bytes, eph_pub: bytes, node_pub: bytes) -> HopKeys:
    """§5.3: split ``HKDF-SHA256(ss, "", info || eph_pub || node_pub, 144)`` into the hop's keys."""
    okm = hkdf_sha256(shared, b"", ONION_KDF_INFO + eph_pub + node_pub, ONION_OKM_LEN)
    return HopKeys(mac=okm[0:32], gcm=okm[32:64], rho=okm[64:96], reply=okm[96:128], replay_tag=okm[128:144])


def header_mac(k_mac: bytes, covered: bytes) -> bytes:
    """§5.4 step 4: ``HMAC-SHA256(k_mac, header without the MAC field)[0:16]``."""
    return hmac.digest(k_mac, covered, hashlib.sha256)[:HEADER_MAC_LEN]


def _payload_aad(payload_len: int) -> bytes:
    return _PREFIX + payload_len.to_bytes(4, "big")


def reply_link_key(k_reply: bytes) -> bytes:
    """§6.2: a hop's 16-byte reply link key, ``HKDF(k_reply, "", "planetserve/v1/reply-link", 16)``."""
    return hkdf_sha256(k_reply, b"", _REPLY_LINK_INFO, 16)


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
    payload_len: int | None = None,
) -> BuiltOnion:
    """Wrap ``clove`` for ``path`` (relays, then the destination last), per §5.5.

    ``payload_len`` pads the payload to a given §5.1 size (a size class, §6.3); ``None``: the smallest that fits.
    ``ephemeral_secrets`` and ``randbytes`` exist only for the test-vector generator; leave them ``None``.
    """
    m = len(path)
    if not (1 <= m <= MAX_HOPS):
        raise InvalidPrivacyParam("len(path)", m, f"1..{MAX_HOPS} hops (relays, then the destination)")
    if not (1 <= ttl <= MAX_TTL):
        raise InvalidPrivacyParam("ttl", ttl, f"1..{MAX_TTL} seconds")
    needed = padded_payload_len(len(clove))
    if needed > MAX_PAYLOAD:
        raise InvalidPrivacyParam("len(clove)", len(clove), f"at most {MAX_PAYLOAD - 4} bytes")
    if payload_len is None:
        payload_len = needed
    elif payload_len < needed or payload_len % PAYLOAD_QUANTUM or payload_len > MAX_PAYLOAD:
        raise InvalidPrivacyParam(
            "payload_len", payload_len, f"a multiple of {PAYLOAD_QUANTUM}, {needed}..{MAX_PAYLOAD}"
        )
    rand = randbytes or secrets.token_bytes
    if ephemeral_secrets is None:
        ephemeral_secrets = [secrets.token_bytes(32) for _ in range(m)]
    if len(ephemeral_secrets) != m:
        raise InvalidPrivacyParam("ephemeral_secrets", len(ephemeral_secrets), f"{m} secrets")
    # One key object per ephemeral secret: building it computes E_i (a scalar multiplication), so deriving the public
    # key and the shared secret from separate objects would cost a third multiplication per hop.
    ephemeral_keys = [private_key(e) for e in ephemeral_secrets]
    current = time.time() if now is None else now
    expiry = math.ceil((current + ttl) / EXPIRY_GRANULARITY) * EXPIRY_GRANULARITY

    eph_pubs = [raw_public_key(e) for e in ephemeral_keys]
    key_ids = [key_id(hop.public_key) for hop in path]
    keys = [
        derive_hop_keys(exchange(e, hop.public_key), eph, hop.public_key)
        for e, eph, hop in zip(ephemeral_keys, eph_pubs, path, strict=True)
    ]
    streams = [ctr_keystream(k.rho, _ZERO8, ROUTING_LEN + SLOT_LEN) for k in keys]

    filler = b""
    for i in range(m - 1):
        filler = xor_bytes(filler + bytes(SLOT_LEN), streams[i][ROUTING_LEN - i * SLOT_LEN : ROUTING_LEN + SLOT_LEN])

    inner = len(clove).to_bytes(4, "big") + clove
    inner += bytes(payload_len - len(inner))
    length_field = payload_len.to_bytes(4, "big")

    routing = b""
    tag = b""
    mac = b""
    for i in range(m - 1, -1, -1):
        if i == m - 1:
            slot = _SLOT.pack(HOP_EXIT, expiry, b"", b"", b"", b"", b"", b"", b"")
            head = slot + rand(ROUTING_LEN - m * SLOT_LEN)
            routing = xor_bytes(head, streams[i][: len(head)]) + filler
        else:
            slot = _SLOT.pack(
                HOP_FORWARD,
                expiry,
                path[i + 1].node_id,
                key_ids[i + 1],
                eph_pubs[i + 1],
                mac,
                tag,
                reply_link_key(keys[i + 1].reply),
                b"",
            )
            routing = xor_bytes(slot + routing[: ROUTING_LEN - SLOT_LEN], streams[i][:ROUTING_LEN])
        inner, tag = gcm_seal(keys[i].gcm, _ZERO12, _payload_aad(payload_len), inner)
        mac = header_mac(keys[i].mac, _PREFIX + key_ids[i] + eph_pubs[i] + tag + routing + length_field)
    packet = _PREFIX + key_ids[0] + eph_pubs[0] + mac + tag + routing + length_field + inner
    assert len(packet) == ONION_HEADER_LEN + payload_len
    return BuiltOnion(
        first_node=path[0].node_id,
        packet=packet,
        relay_reply_keys=tuple(k.reply for k in keys[:-1]),
        reply_keys=tuple(k.reply for k in keys),
        expiry=expiry,
    )


def check_onion_framing(packet: bytes) -> int:
    """§5.4 step 1: lengths, version and type, before any crypto. Returns ``payload_len``."""
    if len(packet) > MAX_PACKET:
        raise MalformedPacket(RejectReason.OVERSIZED)
    if len(packet) < ONION_HEADER_LEN + PAYLOAD_QUANTUM:
        raise MalformedPacket(RejectReason.TOO_SHORT, "onion packet")
    if packet[0] != ONION_VERSION:
        raise MalformedPacket(RejectReason.BAD_VERSION)
    if packet[1] != TYPE_ONION:
        raise MalformedPacket(RejectReason.BAD_TYPE)
    payload_len = int.from_bytes(packet[OFF_PAYLOAD_LEN:ONION_HEADER_LEN], "big")
    if payload_len == 0 or payload_len % PAYLOAD_QUANTUM or payload_len > MAX_PAYLOAD:
        raise MalformedPacket(RejectReason.BAD_LENGTH, "payload_len")
    if len(packet) != ONION_HEADER_LEN + payload_len:
        raise MalformedPacket(RejectReason.BAD_LENGTH, "packet length does not match payload_len")
    return payload_len


def peel(
    packet: bytes,
    keyring: OnionKeyring,
    *,
    now: float | None = None,
    seen: Callable[[bytes], bool] | None = None,
) -> PeeledForward | PeeledExit:
    """Remove this hop's layer, checking in the order of §5.4. Raises ``MalformedPacket`` with the reason.

    ``keyring`` maps key ids to this node's onion keys (one, or several during a rotation). ``seen`` is the replay
    lookup (step 5, e.g. :meth:`ReplayCache.seen`); the caller records the tag of an accepted packet afterwards
    (``ReplayCache.check_and_add``), so that only packets that passed every check take a cache entry.
    """
    payload_len = check_onion_framing(packet)
    key = keyring.get(packet[OFF_KEY_ID:OFF_EPH_PUB])
    if key is None:
        raise MalformedPacket(RejectReason.UNKNOWN_KEY)
    eph_pub = packet[OFF_EPH_PUB:OFF_HEADER_MAC]
    keys = derive_hop_keys(exchange(key.private, eph_pub), eph_pub, key.public)
    covered = packet[:OFF_HEADER_MAC] + packet[OFF_PAYLOAD_TAG:ONION_HEADER_LEN]
    if not hmac.compare_digest(header_mac(keys.mac, covered), packet[OFF_HEADER_MAC:OFF_PAYLOAD_TAG]):
        raise MalformedPacket(RejectReason.BAD_MAC, "header MAC")
    if seen is not None and seen(keys.replay_tag):
        raise MalformedPacket(RejectReason.REPLAY)
    routing = packet[OFF_ROUTING:OFF_PAYLOAD_LEN]
    dec = xor_bytes(routing + bytes(SLOT_LEN), ctr_keystream(keys.rho, _ZERO8, ROUTING_LEN + SLOT_LEN))
    hop_type, expiry, next_node, next_key_id, next_eph, next_mac, next_tag, next_link, pad = _SLOT.unpack_from(dec)
    if hop_type not in (HOP_FORWARD, HOP_EXIT) or any(pad):
        raise MalformedPacket(RejectReason.BAD_SLOT, "hop type or slot padding")
    if hop_type == HOP_EXIT and any(next_node + next_key_id + next_eph + next_mac + next_tag + next_link):
        raise MalformedPacket(RejectReason.BAD_SLOT, "exit slot fields")
    if hop_type == HOP_FORWARD and not any(next_node):
        raise MalformedPacket(RejectReason.BAD_SLOT, "next node id")
    current = time.time() if now is None else now
    if expiry < current or expiry > current + MAX_TTL + EXPIRY_GRANULARITY:
        raise MalformedPacket(RejectReason.EXPIRED)
    try:
        inner = gcm_open(
            keys.gcm, _ZERO12, _payload_aad(payload_len), packet[ONION_HEADER_LEN:], packet[OFF_PAYLOAD_TAG:OFF_ROUTING]
        )
    except AuthenticationFailed as exc:
        raise MalformedPacket(RejectReason.BAD_MAC, "payload authentication failed") from exc
    if hop_type == HOP_EXIT:
        clove_len = int.from_bytes(inner[:4], "big")
        if 4 + clove_len > payload_len:
            raise MalformedPacket(RejectReason.BAD_PAYLOAD, "clove_len")
        if any(inner[4 + clove_len :]):
            raise MalformedPacket(RejectReason.BAD_PAYLOAD, "payload padding")
        return PeeledExit(clove=bytes(inner[4 : 4 + clove_len]), keys=keys, expiry=expiry)
    next_packet = (
        _PREFIX + next_key_id + next_eph + next_mac + next_tag + dec[SLOT_LEN:] + payload_len.to_bytes(4, "big") + inner
    )
    return PeeledForward(
        next_node=next_node, packet=next_packet, keys=keys, expiry=expiry, next_link_key=bytes(next_link)
    )
