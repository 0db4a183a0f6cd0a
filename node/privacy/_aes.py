"""AES-256-GCM and AES-CTR assembled from pycryptodome's C primitives, for single-shot messages.

Why not ``AES.new(key, AES.MODE_GCM)``: pycryptodome builds a GCM object in Python (an ECB cipher for the hash key,
a CTR cipher, a GHASH object, several byte copies), about 45 µs before any data, and a relay runs one GCM per packet
plus one per reply chunk. Every GCM here is one-shot (the whole message at once), so we compute the hash key, the tag
mask and the whole keystream with **one** ECB call over precomputed counter blocks, then run pycryptodome's own C
GHASH. The output is byte-for-byte NIST SP 800-38D GCM (96-bit nonces, 128-bit tags) and CTR; property tests check
every function against ``AES.new`` on random inputs, and the ``docs/protocol.md`` vectors are unchanged.
"""

from __future__ import annotations

import hmac
from typing import Final

from Crypto.Cipher import AES

try:
    from Crypto.Cipher._mode_gcm import _GHASH, _ghash_clmul, _ghash_portable  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - a pycryptodome that moved its internals: use the public API (same bytes)
    _GHASH = None

from node.privacy._constants import MAX_MESSAGE, MAX_PACKET, TAG_LEN

_BLOCK: Final = 16
_GCM_NONCE_LEN: Final = 12
_CTR_NONCE_LEN: Final = 8
#: Counter blocks ``0^12 || i`` (32-bit counter) for i = 0..: XORed with a nonce pattern, they are GCM's blocks.
_MAX_BLOCKS: Final = max(MAX_MESSAGE, MAX_PACKET) // _BLOCK + 4
_GCM_COUNTERS: Final = b"".join(bytes(12) + i.to_bytes(4, "big") for i in range(_MAX_BLOCKS))
#: Counter blocks ``0^8 || i`` (64-bit counter), CTR's layout with an 8-byte nonce.
_CTR_COUNTERS: Final = b"".join(bytes(8) + i.to_bytes(8, "big") for i in range(_MAX_BLOCKS))
_GHASH_IMPL: Final = (_ghash_clmul or _ghash_portable) if _GHASH is not None else None


class AuthenticationFailed(ValueError):
    """The tag does not match: the key, nonce, associated data or ciphertext differ from what was sealed."""


def xor_bytes(a: bytes, b: bytes) -> bytes:
    """``a XOR b[:len(a)]`` via Python's big integers: one C loop, much faster than a per-byte generator."""
    n = len(a)
    if n == 0:
        return b""
    return (int.from_bytes(a, "big") ^ int.from_bytes(b[:n], "big")).to_bytes(n, "big")


def _blocks(nonce_pattern: bytes, counters: bytes, first: int, count: int) -> bytes:
    """Counter blocks ``first .. first+count-1``, each ``nonce || counter``."""
    template = counters[first * _BLOCK : (first + count) * _BLOCK]
    if not any(nonce_pattern):
        return template
    return xor_bytes(nonce_pattern * count, template)


def ctr_keystream(key: bytes, nonce: bytes, length: int, initial_value: int = 0) -> bytes:
    """The first ``length`` bytes of AES-CTR's keystream with an 8-byte nonce and a 64-bit big-endian counter."""
    if len(nonce) != _CTR_NONCE_LEN:
        raise ValueError("CTR nonce must be 8 bytes")
    count = -(-length // _BLOCK)
    if initial_value < 0 or initial_value + count > _MAX_BLOCKS:
        raise ValueError("CTR keystream too long")
    blocks = _blocks(nonce + bytes(8), _CTR_COUNTERS, initial_value, count)
    return AES.new(key, AES.MODE_ECB).encrypt(blocks)[:length]


def ctr_xor(key: bytes, nonce: bytes, data: bytes) -> bytes:
    """AES-CTR encryption (and decryption: it is an XOR) of ``data`` from counter 0."""
    return xor_bytes(data, ctr_keystream(key, nonce, len(data)))


def _gcm_parts(key: bytes, nonce: bytes, length: int) -> tuple[bytes, bytes, bytes]:
    """``(H, E(J0), keystream)`` from one ECB call: ``0^128``, ``nonce || 1``, then ``nonce || 2 ..``."""
    if len(nonce) != _GCM_NONCE_LEN:
        raise ValueError("GCM nonce must be 12 bytes")
    count = -(-length // _BLOCK)
    if count + 2 > _MAX_BLOCKS:
        raise ValueError("GCM message too long")
    blocks = bytes(_BLOCK) + _blocks(nonce + bytes(4), _GCM_COUNTERS, 1, count + 1)
    out = AES.new(key, AES.MODE_ECB).encrypt(blocks)
    return out[:_BLOCK], out[_BLOCK : 2 * _BLOCK], out[2 * _BLOCK : 2 * _BLOCK + length]


def _tag(h: bytes, ej0: bytes, aad: bytes, ciphertext: bytes) -> bytes:
    ghash = _GHASH(h, _GHASH_IMPL)
    lengths = (len(aad) * 8).to_bytes(8, "big") + (len(ciphertext) * 8).to_bytes(8, "big")
    ghash.update(aad + bytes(-len(aad) % _BLOCK) + ciphertext + bytes(-len(ciphertext) % _BLOCK) + lengths)
    return xor_bytes(ghash.digest(), ej0)


def gcm_seal(key: bytes, nonce: bytes, aad: bytes, plaintext: bytes) -> tuple[bytes, bytes]:
    """AES-GCM: ``(ciphertext, 16-byte tag)``. The caller guarantees the ``(key, nonce)`` pair is never reused."""
    if _GHASH_IMPL is None:
        return library_gcm_seal(key, nonce, aad, plaintext)
    h, ej0, stream = _gcm_parts(key, nonce, len(plaintext))
    ciphertext = xor_bytes(plaintext, stream)
    return ciphertext, _tag(h, ej0, aad, ciphertext)[:TAG_LEN]


def gcm_open(key: bytes, nonce: bytes, aad: bytes, ciphertext: bytes, tag: bytes) -> bytes:
    """Check the tag (in constant time), then decrypt. Raises :class:`AuthenticationFailed`, never returns bad data."""
    if _GHASH_IMPL is None:
        return library_gcm_open(key, nonce, aad, ciphertext, tag)
    h, ej0, stream = _gcm_parts(key, nonce, len(ciphertext))
    if len(tag) != TAG_LEN or not hmac.compare_digest(_tag(h, ej0, aad, ciphertext), tag):
        raise AuthenticationFailed("GCM tag mismatch")
    return xor_bytes(ciphertext, stream)


def library_gcm_seal(key: bytes, nonce: bytes, aad: bytes, plaintext: bytes) -> tuple[bytes, bytes]:
    """:func:`gcm_seal` through ``AES.new``: the fallback, and the reference the tests compare against."""
    if len(nonce) != _GCM_NONCE_LEN:
        raise ValueError("GCM nonce must be 12 bytes")
    cipher = AES.new(key, AES.MODE_GCM, nonce=nonce, mac_len=TAG_LEN)
    cipher.update(aad)
    ciphertext, tag = cipher.encrypt_and_digest(plaintext)
    return ciphertext, tag


def library_gcm_open(key: bytes, nonce: bytes, aad: bytes, ciphertext: bytes, tag: bytes) -> bytes:
    """:func:`gcm_open` through ``AES.new``."""
    if len(nonce) != _GCM_NONCE_LEN:
        raise ValueError("GCM nonce must be 12 bytes")
    cipher = AES.new(key, AES.MODE_GCM, nonce=nonce, mac_len=TAG_LEN)
    cipher.update(aad)
    try:
        return cipher.decrypt_and_verify(ciphertext, tag)
    except ValueError as exc:
        raise AuthenticationFailed("GCM tag mismatch") from exc
