"""The sealed request envelope (§4), reply chunks (§6.1) and per-link reply layers and framing (§6.2)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from node.privacy._aes import AuthenticationFailed, ctr_xor, gcm_open, gcm_seal
from node.privacy._constants import (
    ENVELOPE_HEADER_LEN,
    FRAME_LEN_BYTES,
    KEY_LEN,
    MAX_MESSAGE,
    MAX_REPLY_DATA,
    MAX_REPLY_FRAME,
    REPLY_FLAG_ERROR,
    REPLY_FLAG_FINAL,
    REPLY_HEADER_LEN,
    REPLY_PAD_QUANTUM,
    TAG_LEN,
    TYPE_ENVELOPE,
    TYPE_REPLY,
    VERSION,
)
from node.privacy._errors import InvalidPrivacyParam, MalformedPacket, RejectReason

_MAX_SEQ = 2**32 - 1


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
    """Up to 16384 bytes of reply stream (private)."""
    final: bool
    """The last chunk of the reply."""
    error: bool
    """The destination failed; ``data`` is a short UTF-8 reason."""


_REPLY_HEADER = struct.Struct(">BBIB")
assert _REPLY_HEADER.size == REPLY_HEADER_LEN


def _reply_nonce(seq: int) -> bytes:
    return bytes(8) + seq.to_bytes(4, "big")


def seal_reply(reply_key: bytes, seq: int, data: bytes, *, final: bool = False, error: bool = False) -> bytes:
    """Encrypt one reply chunk under the request's reply key (§6.1)."""
    if len(reply_key) != KEY_LEN:
        raise InvalidPrivacyParam("reply_key", len(reply_key), "32 bytes")
    if not (0 <= seq <= _MAX_SEQ):
        raise InvalidPrivacyParam("seq", seq, "0..2^32-1")
    if len(data) > MAX_REPLY_DATA:
        raise InvalidPrivacyParam("len(data)", len(data), f"at most {MAX_REPLY_DATA} bytes")
    flags = (REPLY_FLAG_FINAL if final else 0) | (REPLY_FLAG_ERROR if error else 0)
    header = _REPLY_HEADER.pack(VERSION, TYPE_REPLY, seq, flags)
    plain = len(data).to_bytes(4, "big") + data
    plain += bytes(-len(plain) % REPLY_PAD_QUANTUM)
    # The nonce is the sequence number: unique because seq never repeats under one fresh per-request key.
    ct, tag = gcm_seal(reply_key, _reply_nonce(seq), header, plain)
    return header + ct + tag


def open_reply(reply_key: bytes, body: bytes) -> ReplyChunk:
    """Check and decrypt one reply chunk (§6.1)."""
    if len(body) > MAX_REPLY_FRAME:
        raise MalformedPacket(RejectReason.OVERSIZED, "reply chunk")
    if len(body) < REPLY_HEADER_LEN + REPLY_PAD_QUANTUM + TAG_LEN:
        raise MalformedPacket(RejectReason.TOO_SHORT, "reply chunk")
    version, typ, seq, flags = _REPLY_HEADER.unpack_from(body)
    if version != VERSION:
        raise MalformedPacket(RejectReason.BAD_VERSION)
    if typ != TYPE_REPLY:
        raise MalformedPacket(RejectReason.BAD_TYPE)
    ct_len = len(body) - REPLY_HEADER_LEN - TAG_LEN
    if ct_len % REPLY_PAD_QUANTUM:
        raise MalformedPacket(RejectReason.BAD_LENGTH, "reply ciphertext length")
    if flags & ~(REPLY_FLAG_FINAL | REPLY_FLAG_ERROR):
        raise MalformedPacket(RejectReason.BAD_FIELD, "reply flags")
    try:
        plain = gcm_open(
            reply_key, _reply_nonce(seq), body[:REPLY_HEADER_LEN], body[REPLY_HEADER_LEN:-TAG_LEN], body[-TAG_LEN:]
        )
    except AuthenticationFailed as exc:
        raise MalformedPacket(RejectReason.BAD_MAC, "reply authentication failed") from exc
    data_len = int.from_bytes(plain[:4], "big")
    if data_len > min(len(plain) - 4, MAX_REPLY_DATA) or any(plain[4 + data_len :]):
        raise MalformedPacket(RejectReason.BAD_PAYLOAD, "reply data length or padding")
    return ReplyChunk(
        seq=seq,
        data=bytes(plain[4 : 4 + data_len]),
        final=bool(flags & REPLY_FLAG_FINAL),
        error=bool(flags & REPLY_FLAG_ERROR),
    )


def apply_reply_layer(layer_key: bytes, frame_index: int, body: bytes) -> bytes:
    """Add (or remove: it is an XOR) one relay's reply layer on the ``frame_index``-th frame of a stream (§6.2).

    The nonce is the frame index, unique per link because each relay's ``k_reply`` is fresh per packet.
    """
    return ctr_xor(layer_key, frame_index.to_bytes(8, "big"), body)


def strip_reply_layers(layer_keys: tuple[bytes, ...], frame_index: int, body: bytes) -> bytes:
    """Remove every relay's layer from a frame the client received."""
    for key in layer_keys:
        body = apply_reply_layer(key, frame_index, body)
    return body


def encode_frame(body: bytes) -> bytes:
    """``len u32 || body`` (§6.2)."""
    if not (1 <= len(body) <= MAX_REPLY_FRAME):
        raise InvalidPrivacyParam("len(frame)", len(body), f"1..{MAX_REPLY_FRAME}")
    return len(body).to_bytes(FRAME_LEN_BYTES, "big") + body


def check_frame_len(prefix: bytes) -> int:
    """Read and check a frame length prefix (§6.2)."""
    length = int.from_bytes(prefix, "big")
    if not (1 <= length <= MAX_REPLY_FRAME):
        raise MalformedPacket(RejectReason.BAD_LENGTH, "reply frame length")
    return length
