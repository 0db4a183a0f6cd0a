"""Onion keys and key ids (``docs/protocol.md`` §5.1, §5.3).

Why key ids: a hop may hold several onion keys at once (the current one and, during a rotation's grace period, the
previous one). The packet names the recipient key by ``SHA-256(node_pub)[0:8]``, so a hop picks the right secret
with one dictionary lookup and drops a packet for a key it does not hold before any Diffie-Hellman: junk then costs a
relay a few microseconds. :func:`node.privacy.peel` takes any ``Mapping[bytes, OnionKey]`` (key id to key); a node
that rotates keys keeps such a mapping up to date.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from node.privacy._constants import KEY_ID_LEN
from node.privacy._errors import InvalidPrivacyParam, MalformedPacket
from node.privacy._x25519 import private_key
from node.privacy._x25519 import public_key as x25519_public_key

#: What :func:`~node.privacy.peel` looks recipient keys up in: key id (8 bytes) to key.
OnionKeyring = Mapping[bytes, "OnionKey"]


def key_id(public_key: bytes) -> bytes:
    """§5.1: the 8-byte id of an onion public key, ``SHA-256(node_pub)[0:8]``."""
    if len(public_key) != 32:
        raise InvalidPrivacyParam("public_key", len(public_key), "32 bytes")
    return hashlib.sha256(public_key).digest()[:KEY_ID_LEN]


@dataclass(frozen=True, slots=True)
class OnionKey:
    """One onion key pair of a node, with its key id; the secret is never printed."""

    secret: bytes = field(repr=False)
    """Raw 32-byte X25519 secret."""
    public: bytes = field(init=False, repr=False)
    """Raw 32-byte X25519 public key (what the registry publishes)."""
    key_id: bytes = field(init=False)
    """``SHA-256(public)[0:8]`` (§5.1)."""
    private: X25519PrivateKey = field(init=False, repr=False, compare=False)
    """The ``cryptography`` key object, built once: an agreement then costs only the ladder."""

    def __post_init__(self) -> None:
        try:
            private = private_key(self.secret)
        except MalformedPacket as exc:
            raise InvalidPrivacyParam("secret", len(self.secret), "32 bytes") from exc
        public = x25519_public_key(self.secret)
        object.__setattr__(self, "private", private)
        object.__setattr__(self, "public", public)
        object.__setattr__(self, "key_id", key_id(public))


def keyring(*keys: OnionKey) -> dict[bytes, OnionKey]:
    """A keyring holding ``keys`` (key id to key)."""
    return {k.key_id: k for k in keys}
