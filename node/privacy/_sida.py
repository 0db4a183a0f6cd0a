"""S-IDA: seal a message with AES-256-GCM, disperse the ciphertext (Rabin IDA) and Shamir-share the key.

``docs/protocol.md`` §3. Any ``k`` of the ``n`` cloves rebuild the message; ``k-1`` give ciphertext fragments and key
shares that are independent of the key. IDA and Shamir share one Vandermonde matrix with ``x = index``, so rebuilding
needs one ``k x k`` inversion over GF(2^8).
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from node.privacy import _gf256 as gf
from node.privacy._aes import AuthenticationFailed, gcm_open, gcm_seal
from node.privacy._constants import (
    CLOVE_HEADER_LEN,
    KEY_LEN,
    MAX_MESSAGE,
    MAX_N,
    MESSAGE_ID_LEN,
    NONCE_LEN,
    TYPE_CLOVE,
    VERSION,
)
from node.privacy._errors import InvalidPrivacyParam, MalformedPacket, NotEnoughCloves, RejectReason

#: Source of random bytes: ``secrets.token_bytes`` in production; tests inject a deterministic one for vectors.
RandBytes = Callable[[int], bytes]

_HEADER = struct.Struct(">BBBBB16sI12s16s32s")
assert _HEADER.size == CLOVE_HEADER_LEN


@dataclass(frozen=True, slots=True)
class Clove:
    """One S-IDA share (``docs/protocol.md`` §3.1). Build with :func:`split` or :meth:`from_bytes`."""

    n: int
    """Cloves in the message, 2..16."""
    k: int
    """Cloves needed to rebuild, 2..n."""
    index: int
    """Evaluation point x, 1..n."""
    message_id: bytes
    """16 random bytes shared by all cloves of one message."""
    ct_len: int
    """Ciphertext (= message) length in bytes, 0..262144."""
    nonce: bytes = field(repr=False)
    """12-byte AES-GCM nonce."""
    tag: bytes = field(repr=False)
    """16-byte AES-GCM tag."""
    key_share: bytes = field(repr=False)
    """32-byte Shamir share of the AES key: secret, never printed."""
    fragment: bytes = field(repr=False)
    """``ceil(ct_len / k)`` bytes of dispersed ciphertext."""

    def to_bytes(self) -> bytes:
        """The §3.1 wire form."""
        return (
            _HEADER.pack(
                VERSION,
                TYPE_CLOVE,
                self.n,
                self.k,
                self.index,
                self.message_id,
                self.ct_len,
                self.nonce,
                self.tag,
                self.key_share,
            )
            + self.fragment
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Clove:
        """Parse and check a clove (§3.3): every field and length, before any arithmetic."""
        if len(data) < CLOVE_HEADER_LEN:
            raise MalformedPacket(RejectReason.TOO_SHORT, "clove header")
        version, typ, n, k, index, message_id, ct_len, nonce, tag, key_share = _HEADER.unpack_from(data)
        if version != VERSION:
            raise MalformedPacket(RejectReason.BAD_VERSION)
        if typ != TYPE_CLOVE:
            raise MalformedPacket(RejectReason.BAD_TYPE)
        if not (2 <= n <= MAX_N and 2 <= k <= n and 1 <= index <= n):
            raise MalformedPacket(RejectReason.BAD_FIELD, "n, k or index out of range")
        if ct_len > MAX_MESSAGE:
            raise MalformedPacket(RejectReason.BAD_LENGTH, "ct_len over MAX_MESSAGE")
        if len(data) != CLOVE_HEADER_LEN + _frag_len(ct_len, k):
            raise MalformedPacket(RejectReason.BAD_LENGTH, "clove length does not match ct_len")
        return cls(
            n=n,
            k=k,
            index=index,
            message_id=message_id,
            ct_len=ct_len,
            nonce=nonce,
            tag=tag,
            key_share=key_share,
            fragment=bytes(data[CLOVE_HEADER_LEN:]),
        )


def _frag_len(ct_len: int, k: int) -> int:
    return -(-ct_len // k)


def _aad(n: int, k: int, message_id: bytes, ct_len: int) -> bytes:
    return struct.pack(">BBBB16sI", VERSION, TYPE_CLOVE, n, k, message_id, ct_len)


def split(data: bytes, n: int, k: int, *, randbytes: RandBytes | None = None) -> list[Clove]:
    """Seal ``data`` and split it into ``n`` cloves, any ``k`` of which rebuild it (§3.2).

    ``randbytes`` exists only so that the test-vector generator can fix the randomness; leave it ``None``.
    """
    if not (2 <= n <= MAX_N):
        raise InvalidPrivacyParam("n", n, f"2..{MAX_N}")
    if not (2 <= k <= n):
        raise InvalidPrivacyParam("k", k, f"2..n ({n})")
    if len(data) > MAX_MESSAGE:
        raise InvalidPrivacyParam("len(data)", len(data), f"at most {MAX_MESSAGE} bytes")
    rand = randbytes or secrets.token_bytes
    key = rand(KEY_LEN)
    nonce = rand(NONCE_LEN)
    message_id = rand(MESSAGE_ID_LEN)
    coefficients = rand(KEY_LEN * (k - 1))

    ct_len = len(data)
    ciphertext, tag = gcm_seal(key, nonce, _aad(n, k, message_id, ct_len), data)

    # One (k, flen + 32) matrix: the interleaved ciphertext blocks (rows[j][b] = block_b[j]) beside the Shamir
    # polynomial's coefficients (key first), so one product makes every fragment and every key share.
    flen = _frag_len(ct_len, k)
    rows = np.empty((k, flen + KEY_LEN), dtype=np.uint8)
    padded = np.zeros(flen * k, dtype=np.uint8)
    padded[:ct_len] = np.frombuffer(ciphertext, dtype=np.uint8)
    rows[:, :flen] = padded.reshape(flen, k).T
    rows[:, flen:] = np.frombuffer(key + coefficients, dtype=np.uint8).reshape(k, KEY_LEN)
    xs = tuple(range(1, n + 1))
    out = gf.matmul(gf.vandermonde_matrix(xs, k), rows)
    fragments = out[:, :flen]
    shares = out[:, flen:]
    return [
        Clove(
            n=n,
            k=k,
            index=x,
            message_id=message_id,
            ct_len=ct_len,
            nonce=nonce,
            tag=tag,
            key_share=shares[i].tobytes(),
            fragment=fragments[i].tobytes(),
        )
        for i, x in enumerate(xs)
    ]


def combine(cloves: Iterable[Clove]) -> bytes:
    """Rebuild and authenticate the message from any ``k`` distinct cloves (§3.3).

    Raises :class:`NotEnoughCloves` with fewer than ``k`` distinct indices, ``MalformedPacket(INCONSISTENT)`` when the
    cloves disagree or an extra clove does not match the rebuilt message, and ``MalformedPacket(BAD_MAC)`` when the
    rebuilt message fails authentication (some clove was tampered with).
    """
    by_index: dict[int, Clove] = {}
    first: Clove | None = None
    for clove in cloves:
        if first is None:
            first = clove
        elif (clove.n, clove.k, clove.message_id, clove.ct_len, clove.nonce, clove.tag) != (
            first.n,
            first.k,
            first.message_id,
            first.ct_len,
            first.nonce,
            first.tag,
        ):
            raise MalformedPacket(RejectReason.INCONSISTENT, "cloves of different messages or tampered headers")
        previous = by_index.get(clove.index)
        if previous is None:
            by_index[clove.index] = clove
        elif previous != clove:
            raise MalformedPacket(RejectReason.INCONSISTENT, "two different cloves share an index")
    if first is None:
        raise NotEnoughCloves(have=0, need=2)
    k = first.k
    if len(by_index) < k:
        raise NotEnoughCloves(have=len(by_index), need=k)
    for clove in by_index.values():
        if len(clove.fragment) != _frag_len(clove.ct_len, k) or clove.index > clove.n:
            raise MalformedPacket(RejectReason.BAD_LENGTH, "fragment length")
    chosen = list(by_index.values())[:k]
    extras = list(by_index.values())[k:]
    flen = _frag_len(first.ct_len, k)
    stacked = np.frombuffer(b"".join(c.fragment + c.key_share for c in chosen), dtype=np.uint8).reshape(k, -1)
    rows = gf.matmul(gf.inverse_vandermonde(tuple(c.index for c in chosen)), stacked)
    ciphertext = rows[:, :flen].T.reshape(-1)[: first.ct_len].tobytes()
    key = rows[0, flen:].tobytes()
    try:
        plaintext = gcm_open(key, first.nonce, _aad(first.n, k, first.message_id, first.ct_len), ciphertext, first.tag)
    except AuthenticationFailed as exc:
        raise MalformedPacket(RejectReason.BAD_MAC, "message authentication failed") from exc
    if extras:
        expect = gf.matmul(gf.vandermonde_matrix(tuple(c.index for c in extras), k), rows)
        for i, clove in enumerate(extras):
            if expect[i].tobytes() != clove.fragment + clove.key_share:
                raise MalformedPacket(RejectReason.INCONSISTENT, f"clove {clove.index} does not match the message")
    return bytes(plaintext)
