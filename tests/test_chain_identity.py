"""The node's X25519 identity: created once with private file modes, reloaded identically, never printed."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from Crypto.Protocol.DH import import_x25519_private_key, import_x25519_public_key, key_agreement

from node import IdentityError, NodeIdentity


def test_identity_is_created_with_private_modes_and_reloaded(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = NodeIdentity.load_or_create(state)
    key_file = state / "x25519.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert len(first.public_key) == 32 and len(first.private_key) == 32
    again = NodeIdentity.load_or_create(state)
    assert again == first
    assert NodeIdentity.load_or_create(tmp_path / "other").public_key != first.public_key


def test_identity_keys_agree_with_x25519(tmp_path: Path) -> None:
    a = NodeIdentity.load_or_create(tmp_path / "a")
    b = NodeIdentity.generate()

    def kdf(x: bytes | bytearray | memoryview) -> bytes:
        return bytes(x)

    shared_ab = key_agreement(
        static_priv=import_x25519_private_key(a.private_key), static_pub=import_x25519_public_key(b.public_key), kdf=kdf
    )
    shared_ba = key_agreement(
        static_priv=import_x25519_private_key(b.private_key), static_pub=import_x25519_public_key(a.public_key), kdf=kdf
    )
    assert shared_ab == shared_ba and len(shared_ab) == 32


def test_repr_never_shows_the_private_key(tmp_path: Path) -> None:
    identity = NodeIdentity.load_or_create(tmp_path)
    text = repr(identity) + str(identity)
    assert identity.private_key.hex() not in text and str(identity.private_key) not in text


def test_bad_key_files_are_rejected(tmp_path: Path) -> None:
    NodeIdentity.load_or_create(tmp_path)
    key_file = tmp_path / "x25519.key"
    os.chmod(key_file, 0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        NodeIdentity.load_or_create(tmp_path)
    os.chmod(key_file, 0o600)
    key_file.write_bytes(b"short")
    with pytest.raises(IdentityError) as exc:
        NodeIdentity.load_or_create(tmp_path)
    assert exc.value.code.startswith("key")
