"""RFC 7748 X25519 through pyca ``cryptography`` (OpenSSL), with the protocol's low-order check.

Why a module of our own: the protocol passes raw 32-byte keys everywhere and must reject an all-zero shared secret
as ``BAD_KEY`` (``docs/protocol.md`` §5.3); ``cryptography`` raises a bare ``ValueError`` for that, which we map.
OpenSSL's ladder costs about 50 µs per agreement here, against about 180 µs for pycryptodome's public
``Crypto.Protocol.DH`` path, so the earlier private-API shortcut is no longer needed.
"""

from __future__ import annotations

from typing import Final

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from node.privacy._errors import MalformedPacket, RejectReason

#: The base point's u-coordinate.
BASE_POINT: Final = (9).to_bytes(32, "little")


def private_key(secret: bytes) -> X25519PrivateKey:
    """The ``cryptography`` key object of a raw 32-byte secret (build it once per key: it costs a few µs)."""
    if len(secret) != 32:
        raise MalformedPacket(RejectReason.BAD_KEY, "X25519 secrets are 32 bytes")
    return X25519PrivateKey.from_private_bytes(secret)


def exchange(key: X25519PrivateKey, u: bytes) -> bytes:
    """``X25519(key, u)`` for a raw 32-byte u-coordinate (RFC 7748 §5: the top bit of ``u`` is ignored).

    Raises ``MalformedPacket(BAD_KEY)`` when the result is all zero (a low-order point), as §5.3 requires.
    """
    if len(u) != 32:
        raise MalformedPacket(RejectReason.BAD_KEY, "X25519 public keys are 32 bytes")
    try:
        return key.exchange(X25519PublicKey.from_public_bytes(u))
    except ValueError as exc:  # OpenSSL refuses an all-zero shared secret
        raise MalformedPacket(RejectReason.BAD_KEY, "low-order point") from exc


def x25519(scalar: bytes, u: bytes) -> bytes:
    """``X25519(scalar, u)`` with raw 32-byte little-endian inputs and output (RFC 7748 §5)."""
    return exchange(private_key(scalar), u)


def raw_public_key(key: X25519PrivateKey) -> bytes:
    """The raw 32-byte public key of a key object (computed when the object was built: no multiplication here)."""
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def public_key(secret: bytes) -> bytes:
    """The raw X25519 public key of a 32-byte secret."""
    return raw_public_key(private_key(secret))
