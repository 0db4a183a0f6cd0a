"""Ethereum addresses: 20 bytes, written as EIP-55 checksummed hex everywhere above the edges.

Why a ``str`` ``NewType``: web3 and eth-account speak checksummed text, so the checksummed text is the one form; the
type marks a value that went through :func:`parse_address`. For the type checker it *is* eth-typing's
``ChecksumAddress`` (imported under ``TYPE_CHECKING`` only, so nothing loads at run time): a kernel address goes to
web3 and the ledger's handles without a cast, and the two never count as different types.

Mixed-case input must carry a valid checksum (EIP-55's point: a mistyped address is caught); all-lowercase or
all-uppercase input is checksummed here.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, NewType, TypeAlias, cast

from planetserve._errors import InvalidValue
from planetserve._keccak import keccak256

if TYPE_CHECKING:
    from eth_typing import ChecksumAddress

    Address: TypeAlias = ChecksumAddress
else:
    #: A 20-byte address as EIP-55 checksummed ``0x`` + 40 hex text.
    Address = NewType("Address", str)

_HEX40 = re.compile(r"0x[0-9a-fA-F]{40}")


def _checksummed(lower_hex: str) -> str:
    digest = keccak256(lower_hex.encode("ascii")).hex()
    return "0x" + "".join(c.upper() if c.isalpha() and int(digest[i], 16) >= 8 else c for i, c in enumerate(lower_hex))


def parse_address(value: object, *, param: str = "address") -> Address:
    """``value`` (``0x`` + 40 hex text, or 20 raw bytes) as a checksummed address, or ``InvalidValue``."""
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        if len(raw) != 20:
            raise InvalidValue(param, f"<{len(raw)} bytes>", "an address is exactly 20 bytes")
        return cast("Address", _checksummed(raw.hex()))
    if not isinstance(value, str) or not _HEX40.fullmatch(value):
        shown = value if isinstance(value, str) else type(value).__name__
        raise InvalidValue(param, shown, "not a 20-byte hex address")
    body = value[2:]
    result = _checksummed(body.lower())
    if body != body.lower() and body != body.upper() and result != value:
        raise InvalidValue(param, value, "mixed-case address with a wrong EIP-55 checksum")
    return cast("Address", result)


def address_bytes(address: str) -> bytes:
    """The 20 raw bytes of ``address`` (parsed first, so a bad one raises ``InvalidValue``)."""
    return bytes.fromhex(parse_address(address)[2:])
