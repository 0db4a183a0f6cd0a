"""The sealed request envelope (§4), fixed-size reply chunks (§6.1) and the per-link reply frames (§6.2).

A reply crosses every link as frames of one size (``REPLY_FRAME_LEN``), each re-encrypted by the hop that sends it
(destination included) and tagged under that hop's link key, so that a relay can neither mark a reply by its length
nor have an outsider's insertion pass its successor unnoticed; content is authenticated end to end (``reply_key``).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass, field

from node.privacy._aes import AuthenticationFailed, ctr_xor, gcm_open, gcm_seal
from node.privacy._constants import (
    ENVELOPE_HEADER_LEN,
    FRAME_LEN_BYTES,
    KEY_LEN,
    LINK_KEY_LEN,
    LINK_TAG_LEN,
    MAX_MESSAGE,
    MAX_REPLY_DATA,
    REPLY_CHUNK_LEN,
    REPLY_CT_LEN,
    REPLY_DEST_INFO,
    REPLY_FLAG_ERROR,
    REPLY_FLAG_FINAL,
    REPLY_FRAME_BODY,
    REPLY_FRAME_LEN,
    REPLY_HEADER_LEN,
    REPLY_LINK_INFO,
    TAG_LEN,
    TYPE_ENVELOPE,
    TYPE_REPLY,
    VERSION,
)
from node.privacy._errors import InvalidPrivacyParam, MalformedPacket, RejectReason

_MAX_SEQ = 2**32 - 1
_FRAME_PREFIX = REPLY_FRAME_BODY.to_bytes(FRAME_LEN_BYTES, "big")


@dataclass(frozen=True, slots=True)
class Envelope:
    """The plaintext a client splits into cloves: the reply key and the application request."""

    reply_key: bytes = field(repr=False)
    """32 fresh random bytes keying every reply chunk of this request."""
    body: bytes = field(repr=False)
    """The application request (opaque to the privacy layer): never printed."""

    def to_bytes(self) -> bytes:
        """The §4 wire form."""
        return bytes((VERSION, TYPE_ENVELOPE)) + self.reply_key + len(self.body).to_bytes(4, "big") + self.body

    @classmethod
    def from_bytes(cls, data: bytes) -> Envelope:
        """Parse and check a §4 envelope."""
        if len(data) < ENVELOPE_HEADER_LEN:
            raise MalformedPacket(RejectReason.TOO_SHORT, "envelope")
        if data[0] != VERSION:
            raise MalformedPacket(RejectReason.BAD_VERSION)
        if data[1] != TYPE_ENVELOPE:
            raise MalformedPacket(RejectReason.BAD_TYPE)
        body_len = int.from_bytes(data[34:38], "big")
        if len(data) != ENVELOPE_HEADER_LEN + body_len:
            raise MalformedPacket(RejectReason.BAD_LENGTH, "envelope body_len")
        return cls(reply_key=bytes(data[2:34]), body=bytes(data[38:]))

    @staticmethod
    def max_body() -> int:
        """The largest body that still fits ``MAX_MESSAGE``."""
        return MAX_MESSAGE - ENVELOPE_HEADER_LEN


@dataclass(frozen=True, slots=True)
class ReplyChunk:
    """One decrypted reply chunk."""

    seq: int
    """0-based sequence number within the request."""
    data: bytes = field(repr=False)
    """Up to ``MAX_REPLY_DATA`` (465) bytes of reply stream (private)."""
    final: bool
    """The last chunk of the reply."""
    error: bool
    """The destination failed; ``data`` is a short UTF-8 reason (always with ``final``)."""


_REPLY_HEADER = struct.Struct(">BBIB")
assert _REPLY_HEADER.size == REPLY_HEADER_LEN
assert REPLY_HEADER_LEN + REPLY_CT_LEN + TAG_LEN == REPLY_CHUNK_LEN


def _reply_nonce(seq: int) -> bytes:
    return bytes(8) + seq.to_bytes(4, "big")


def seal_reply(reply_key: bytes, seq: int, data: bytes, *, final: bool = False, error: bool = False) -> bytes:
    """Encrypt one reply chunk under the request's reply key (§6.1): always ``REPLY_CHUNK_LEN`` bytes."""
    if len(reply_key) != KEY_LEN:
        raise InvalidPrivacyParam("reply_key", len(reply_key), "32 bytes")
    if not (0 <= seq <= _MAX_SEQ):
        raise InvalidPrivacyParam("seq", seq, "0..2^32-1")
    if len(data) > MAX_REPLY_DATA:
        raise InvalidPrivacyParam("len(data)", len(data), f"at most {MAX_REPLY_DATA} bytes")
    if error and not final:
        raise InvalidPrivacyParam("error", error, "an ERROR chunk is also FINAL")
    flags = (REPLY_FLAG_FINAL if final else 0) | (REPLY_FLAG_ERROR if error else 0)
    header = _REPLY_HEADER.pack(VERSION, TYPE_REPLY, seq, flags)
    plain = len(data).to_bytes(4, "big") + data
    plain += bytes(REPLY_CT_LEN - len(plain))
    # The nonce is the sequence number: unique because seq never repeats under one fresh per-request key.
    ct, tag = gcm_seal(reply_key, _reply_nonce(seq), header, plain)
    return header + ct + tag


def open_reply(reply_key: bytes, chunk: bytes) -> ReplyChunk:
    """Check and decrypt one reply chunk, in the order §6.1 fixes (length, version, type, flags, MAC, payload)."""
    if len(chunk) != REPLY_CHUNK_LEN:
        raise MalformedPacket(RejectReason.BAD_LENGTH, "reply chunk length")
    version, typ, seq, flags = _REPLY_HEADER.unpack_from(chunk)
    if version != VERSION:
        raise MalformedPacket(RejectReason.BAD_VERSION)
    if typ != TYPE_REPLY:
        raise MalformedPacket(RejectReason.BAD_TYPE)
    if flags & ~(REPLY_FLAG_FINAL | REPLY_FLAG_ERROR) or flags == REPLY_FLAG_ERROR:
        raise MalformedPacket(RejectReason.BAD_FIELD, "reply flags")
    try:
        plain = gcm_open(
            reply_key, _reply_nonce(seq), chunk[:REPLY_HEADER_LEN], chunk[REPLY_HEADER_LEN:-TAG_LEN], chunk[-TAG_LEN:]
        )
    except AuthenticationFailed as exc:
        raise MalformedPacket(RejectReason.BAD_MAC, "reply authentication failed") from exc
    data_len = int.from_bytes(plain[:4], "big")
    if data_len > MAX_REPLY_DATA or any(plain[4 + data_len :]):
        raise MalformedPacket(RejectReason.BAD_PAYLOAD, "reply data length or padding")
    return ReplyChunk(
        seq=seq,
        data=bytes(plain[4 : 4 + data_len]),
        final=bool(flags & REPLY_FLAG_FINAL),
        error=bool(flags & REPLY_FLAG_ERROR),
    )


def reply_link_key(k_reply: bytes) -> bytes:
    """§6.2: ``λ = HKDF-SHA256(k_reply, salt = "", info = REPLY_LINK_INFO, L = 16)``, the hop's link key.

    One HKDF block: extract with the RFC's all-zero salt, then a single expand step (16 <= 32 bytes).
    """
    if len(k_reply) != KEY_LEN:
        raise InvalidPrivacyParam("k_reply", len(k_reply), "32 bytes")
    prk = hmac.digest(bytes(32), k_reply, hashlib.sha256)
    return hmac.digest(prk, REPLY_LINK_INFO + b"\x01", hashlib.sha256)[:LINK_KEY_LEN]


def destination_layer_key(reply_key: bytes, clove_index: int) -> bytes:
    """§6.2: the destination's layer key on the path that carried clove ``clove_index``:
    ``HKDF-SHA256(reply_key, salt = "", info = REPLY_DEST_INFO || u8(index), L = 32)``.

    Both ends know it (the client chose the key and the indices) and no relay does; it differs per path, so the last
    relays of one request's paths see different bytes.
    """
    if len(reply_key) != KEY_LEN:
        raise InvalidPrivacyParam("reply_key", len(reply_key), "32 bytes")
    if not (1 <= clove_index <= 255):
        raise InvalidPrivacyParam("clove_index", clove_index, "1..255")
    prk = hmac.digest(bytes(32), reply_key, hashlib.sha256)
    return hmac.digest(prk, REPLY_DEST_INFO + bytes((clove_index, 1)), hashlib.sha256)


def _link_tag(link_key: bytes, index: int, body: bytes) -> bytes:
    return hmac.digest(link_key, index.to_bytes(8, "big") + body, hashlib.sha256)[:LINK_TAG_LEN]


def apply_reply_layer(layer_key: bytes, frame_index: int, body: bytes) -> bytes:
    """Add (or remove: it is an XOR) one hop's reply layer on the ``frame_index``-th frame of a stream (§6.2).

    The nonce is the frame index, unique per stream because each hop's ``k_reply`` is fresh per packet.
    """
    return ctr_xor(layer_key, frame_index.to_bytes(8, "big"), body)


def strip_reply_layers(layer_keys: tuple[bytes, ...], frame_index: int, body: bytes) -> bytes:
    """Remove every hop's layer from a frame body the client received (the layers commute)."""
    for key in layer_keys:
        body = apply_reply_layer(key, frame_index, body)
    return body


def check_frame_len(prefix: bytes) -> int:
    """§6.2 receiver step 1: the 4-byte ``len`` must be ``REPLY_FRAME_BODY``; returns it."""
    if prefix != _FRAME_PREFIX:
        raise MalformedPacket(RejectReason.BAD_LENGTH, "reply frame length")
    return REPLY_FRAME_BODY


def seal_frame(layer_key: bytes, link_key: bytes, index: int, body: bytes) -> bytes:
    """§6.2 sender: add this hop's layer to ``body`` (a chunk, or a frame body from upstream) and tag it.

    Returns the whole ``REPLY_FRAME_LEN``-byte frame, length prefix included.
    """
    if len(body) != REPLY_CHUNK_LEN:
        raise InvalidPrivacyParam("len(body)", len(body), f"{REPLY_CHUNK_LEN} bytes")
    layered = apply_reply_layer(layer_key, index, body)
    return _FRAME_PREFIX + layered + _link_tag(link_key, index, layered)


def open_frame(link_key: bytes, index: int, frame_body: bytes) -> bytes:
    """§6.2 receiver step 2: check the link tag of the ``index``-th frame; returns the (still layered) body.

    ``frame_body`` is the ``REPLY_FRAME_BODY`` bytes after the length prefix.
    """
    if len(frame_body) != REPLY_FRAME_BODY:
        raise MalformedPacket(RejectReason.BAD_LENGTH, "reply frame length")
    body = frame_body[:REPLY_CHUNK_LEN]
    if not hmac.compare_digest(_link_tag(link_key, index, body), frame_body[REPLY_CHUNK_LEN:]):
        raise MalformedPacket(RejectReason.BAD_MAC, "reply frame link tag")
    return body


@dataclass(slots=True)
class FrameReader:
    """The receiving end of one link (§6.2): checks each frame's tag under the sender's link key, counting frames."""

    link_key: bytes = field(repr=False)
    """The sending hop's 16-byte link key (a relay's ``next_link_key``; the client's ``λ_0``)."""
    index: int = 0
    """Frames checked so far (the next frame's index)."""

    def open(self, frame_body: bytes) -> bytes:
        """Check the next frame (the bytes after its length prefix) and return its layered body."""
        body = open_frame(self.link_key, self.index, frame_body)
        self.index += 1
        return body


@dataclass(slots=True)
class FrameWriter:
    """The sending end of one link (§6.2): layers and tags each frame under this hop's keys, counting frames."""

    layer_key: bytes = field(repr=False)
    """This hop's ``k_reply``."""
    link_key: bytes = field(repr=False)
    """This hop's link key, ``reply_link_key(k_reply)``."""
    index: int = 0
    """Frames sent so far (the next frame's index)."""

    @classmethod
    def for_hop(cls, k_reply: bytes) -> FrameWriter:
        """The writer of a hop whose §5.3 reply key is ``k_reply``."""
        return cls(layer_key=k_reply, link_key=reply_link_key(k_reply))

    def seal(self, body: bytes) -> bytes:
        """The next whole frame carrying ``body`` (``REPLY_CHUNK_LEN`` bytes)."""
        frame = seal_frame(self.layer_key, self.link_key, self.index, body)
        self.index += 1
        return frame


assert FRAME_LEN_BYTES + REPLY_FRAME_BODY == REPLY_FRAME_LEN
