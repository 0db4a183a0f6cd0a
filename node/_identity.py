"""The node's long-lived X25519 identity: created on first use in its state directory, loaded afterwards.

The public half goes on chain (``NodeRegistry.register``) and is what clients onion-encrypt to; the privacy layer uses
the same raw 32-byte format (RFC 7748). The private half lives in ``<state_dir>/x25519.key`` as raw 32 bytes, mode
0600 in a 0700 directory, and never appears in reprs, logs or output.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from node._errors import PlanetServeError

#: File name of the private key inside the state directory.
KEY_FILE = "x25519.key"
#: Raw X25519 key size in bytes (RFC 7748).
KEY_SIZE = 32


class IdentityError(PlanetServeError):
    """The node's key file is unreadable, malformed or readable by others."""

    code = "key_identity"


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """An X25519 key pair. ``repr`` shows only the public key."""

    #: Raw 32-byte X25519 public key (what goes on chain).
    public_key: bytes
    #: Raw 32-byte X25519 private scalar seed; never printed.
    private_key: bytes = field(repr=False)

    @classmethod
    def generate(cls) -> NodeIdentity:
        """A fresh key pair from the OS CSPRNG (via pycryptodome)."""
        from Crypto.PublicKey import ECC

        key = ECC.generate(curve="Curve25519")
        return cls(public_key=key.public_key().export_key(format="raw"), private_key=bytes(key.seed))

    @classmethod
    def from_private_key(cls, private_key: bytes) -> NodeIdentity:
        """Rebuild the pair from the raw 32-byte private key."""
        from Crypto.PublicKey import ECC

        if len(private_key) != KEY_SIZE:
            raise IdentityError(f"an X25519 private key is {KEY_SIZE} bytes, got {len(private_key)}")
        key = ECC.construct(curve="Curve25519", seed=private_key)  # type: ignore[arg-type]  # stubs say str|int; bytes is the documented runtime type
        return cls(public_key=key.public_key().export_key(format="raw"), private_key=bytes(private_key))

    @classmethod
    def load_or_create(cls, state_dir: Path) -> NodeIdentity:
        """Load ``<state_dir>/x25519.key``, creating the directory (0700) and key (0600) on first use."""
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = state_dir / KEY_FILE
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return cls._load(path)
        identity = cls.generate()
        with os.fdopen(fd, "wb") as handle:
            handle.write(identity.private_key)
        return identity

    @classmethod
    def _load(cls, path: Path) -> NodeIdentity:
        try:
            mode = path.stat().st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise IdentityError(f"{path} is accessible by group/others (mode {mode & 0o777:o}); chmod 600 it")
            data = path.read_bytes()
        except OSError as exc:
            raise IdentityError(f"cannot read node key {path}: {exc.strerror}") from exc
        if len(data) != KEY_SIZE:
            raise IdentityError(f"node key {path} is {len(data)} bytes, expected {KEY_SIZE}")
        return cls.from_private_key(data)
