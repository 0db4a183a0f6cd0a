"""Keccak-256 (Ethereum's hash, not NIST SHA3-256), the one hash the kernel needs: model ids and EIP-55 checksums.

Why pycryptodome and why lazily: the standard library has only SHA3-256, whose padding differs, so keccak needs a
library; pycryptodome is already a core dependency (it is eth-hash's backend here, so the digests are web3's), and
its public ``Crypto.Hash.keccak`` is used. The import (about 0.2 s: a C extension through cffi) happens inside the
function, so ``import planetserve`` stays free of third-party modules (tests/test_layering.py) and costs nothing for
a process that never hashes.
"""

from __future__ import annotations


def keccak256(data: bytes) -> bytes:
    """The 32-byte Keccak-256 digest of ``data``."""
    from Crypto.Hash import keccak

    return keccak.new(digest_bits=256, data=data).digest()
