"""Raw RFC 7748 X25519 over pycryptodome's C Montgomery ladder.

pycryptodome's public ``Crypto.Protocol.DH`` path costs three scalar multiplications per agreement (it validates and
re-derives keys through ``EccKey`` objects); relays do one agreement per packet, so we call the same C routine
directly: one ladder per agreement, about 6x faster. A test checks every result against the public API.
"""

from __future__ import annotations

from typing import Final

from Crypto.PublicKey._montgomery import curve25519_curve
from Crypto.Util._raw_api import (
    SmartPointer,
    VoidPointer,
    c_size_t,
    c_uint8_ptr,
    c_ulonglong,
    create_string_buffer,
    get_raw_buffer,
)

from node.privacy._errors import MalformedPacket, RejectReason

_LIB: Final = curve25519_curve().rawlib  # type: ignore[no-untyped-call]
#: The base point's u-coordinate.
BASE_POINT: Final = (9).to_bytes(32, "little")
_P: Final = 2**255 - 19


def x25519(scalar: bytes, u: bytes) -> bytes:
    """``X25519(scalar, u)`` with raw 32-byte little-endian inputs and output (RFC 7748 §5).

    Raises ``MalformedPacket(BAD_KEY)`` when the result is all zero (a low-order point), as §5.3 requires.
    """
    if len(scalar) != 32 or len(u) != 32:
        raise MalformedPacket(RejectReason.BAD_KEY, "X25519 inputs are 32 bytes")
    k = bytearray(scalar)
    k[0] &= 248
    k[31] &= 127
    k[31] |= 64
    k_big = bytes(reversed(k))
    u_int = int.from_bytes(u, "little") & ((1 << 255) - 1)
    u_big = (u_int % _P).to_bytes(32, "big")
    point = VoidPointer()
    if _LIB.new_point(point.address_of(), c_uint8_ptr(u_big), c_size_t(32), None) != 0:
        raise MalformedPacket(RejectReason.BAD_KEY, "not a curve point")
    smart = SmartPointer(point.get(), _LIB.free_point)
    # The seed only randomises the ladder's internal blinding; it does not change the result.
    if _LIB.scalar(smart.get(), c_uint8_ptr(k_big), c_size_t(32), c_ulonglong(0x5EED)) != 0:
        raise MalformedPacket(RejectReason.BAD_KEY, "scalar multiplication failed")
    out = create_string_buffer(32)  # type: ignore[call-arg]
    if _LIB.get_x(out, c_size_t(32), smart.get()) != 0:
        # The point at infinity: only reachable from a low-order input.
        raise MalformedPacket(RejectReason.BAD_KEY, "low-order point")
    result = bytes(reversed(get_raw_buffer(out)))
    if result == bytes(32):
        raise MalformedPacket(RejectReason.BAD_KEY, "low-order point")
    return result


def public_key(secret: bytes) -> bytes:
    """The raw X25519 public key of a 32-byte secret."""
    return x25519(secret, BASE_POINT)
