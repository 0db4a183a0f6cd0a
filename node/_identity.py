"""The node's onion keys: X25519 key pairs kept in its state directory, the current one published on chain.

The node's long-term identity is its operator's Ethereum key (it signs every registry transaction); the onion key is
a medium-term key that **rotates**, so that a key seized later cannot decrypt traffic recorded before the last
rotation's grace period ended. The public half goes on chain (``NodeRegistry.register``/``update``, signed by the
operator) and is what clients onion-encrypt to; the privacy layer uses the same raw 32-byte format (RFC 7748).

Files in the state directory (each raw 32 bytes, mode 0600, in a 0700 directory; never in reprs, logs or output):

- ``x25519.key``: the current key (what ``ps-node register`` publishes and new packets use);
- ``x25519.pending.key``: a rotation in progress: made before the ``update`` transaction is sent, so that the node
  already accepts packets to it when clients first see it on chain;
- ``x25519.previous.key`` and ``x25519.previous.json`` (``{"retired_at", "delete_after"}``, Unix seconds): the key
  a rotation replaced, still accepted until ``delete_after`` (the grace period), then overwritten and unlinked.

:class:`OnionKeyStore` makes these changes; :class:`RotatingKeyring` is what a running node peels with: a mapping
from key id to key that :meth:`RotatingKeyring.reload` re-reads from the directory (the overlay does so every
``OverlayConfig.keyring_reload_s``), so a rotation needs no restart.
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from node._errors import PlanetServeError

if TYPE_CHECKING:
    from node.privacy import OnionKey

#: File name of the current private key inside the state directory.
KEY_FILE = "x25519.key"
#: A rotation's new key, before its ``update`` transaction is mined.
PENDING_KEY_FILE = "x25519.pending.key"
#: The key a rotation replaced, kept for the grace period, and its timing record.
PREVIOUS_KEY_FILE = "x25519.previous.key"
PREVIOUS_META_FILE = "x25519.previous.json"
#: Raw X25519 key size in bytes (RFC 7748).
KEY_SIZE = 32
#: Seconds a client's view of the registry may lag the chain (an index refreshed every 15 s, plus block time and
#: slack): a client may still build packets to the old key that long after the rotation was mined.
DIRECTORY_LAG_S: Final = 60
#: Shortest grace period: a packet built just before the client saw the new key lives ``MAX_TTL`` seconds, rounded
#: up by ``EXPIRY_GRANULARITY`` (``docs/protocol.md`` §5.2; 120 + 10, pinned by a test against node.privacy).
MIN_GRACE_S: Final = 120 + 10 + DIRECTORY_LAG_S
#: Default grace period of a rotation.
DEFAULT_GRACE_S: Final = 900


class IdentityError(PlanetServeError):
    """The node's key file is unreadable, malformed or readable by others."""

    code = "key_identity"


class RotationInProgress(IdentityError):
    """A rotation cannot start yet: the previous key is still in its grace period (until ``delete_after``)."""

    code = "key_rotation_in_progress"

    def __init__(self, delete_after: float) -> None:
        self.delete_after = delete_after
        wait = max(0, round(delete_after - time.time()))
        super().__init__(f"the previous onion key is still in its grace period for {wait} s; rotate after that")


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


def _write_secret(path: Path, secret: bytes) -> None:
    """Write a key file that did not exist, mode 0600, flushed to disk before it is used."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(secret)
        handle.flush()
        os.fsync(handle.fileno())


def shred(path: Path) -> bool:
    """Overwrite a key file with zeros, flush, then unlink it; False if it was not there.

    Why overwrite: unlinking alone leaves the bytes in the freed blocks. On copy-on-write or journalling file systems
    and SSDs even an overwrite is not a guarantee, which ``docs/threat-model.md`` says; it is the best a process can do.
    """
    try:
        fd = os.open(path, os.O_WRONLY)
    except FileNotFoundError:
        return False
    try:
        size = os.fstat(fd).st_size
        os.write(fd, bytes(size))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        path.unlink()
    except FileNotFoundError:  # another process (the node and the CLI both prune) was first
        return False
    return True


class OnionKeyStore:
    """The onion keys in one state directory: current, pending (a rotation in progress) and previous (in grace).

    A rotation is three steps, so that no packet is ever sent to a key the node does not hold:
    :meth:`begin_rotation` writes the pending key (a running node starts accepting it at its next reload), the
    operator publishes it on chain, then :meth:`commit_rotation` makes it current and keeps the old one for
    ``grace_s`` seconds (:meth:`abort_rotation` shreds it instead when the transaction failed). :meth:`prune`
    shreds a previous key whose grace period is over; :meth:`identities` prunes first.
    """

    def __init__(
        self, state_dir: Path, *, grace_s: float = DEFAULT_GRACE_S, clock: Callable[[], float] = time.time
    ) -> None:
        if grace_s < MIN_GRACE_S:
            raise IdentityError(
                f"grace period {grace_s} s is shorter than {MIN_GRACE_S} s (packet lifetime + directory lag)"
            )
        self.state_dir = state_dir
        self.grace_s = grace_s
        self._clock = clock

    def _path(self, name: str) -> Path:
        return self.state_dir / name

    def current(self) -> NodeIdentity:
        """The current key (created on first use)."""
        return NodeIdentity.load_or_create(self.state_dir)

    def pending(self) -> NodeIdentity | None:
        """The key of a rotation in progress, if any."""
        path = self._path(PENDING_KEY_FILE)
        return NodeIdentity._load(path) if path.exists() else None

    def previous(self) -> tuple[NodeIdentity, float] | None:
        """The replaced key still in its grace period, with its ``delete_after`` time, if any."""
        path = self._path(PREVIOUS_KEY_FILE)
        if not path.exists():
            return None
        return NodeIdentity._load(path), self._delete_after()

    def _delete_after(self) -> float:
        meta = self._path(PREVIOUS_META_FILE)
        try:
            return float(json.loads(meta.read_text())["delete_after"])
        except FileNotFoundError:
            return 0.0  # no record (a crash between the two writes): past grace, shred at once
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IdentityError(f"cannot read {meta} ({type(exc).__name__})") from exc

    def prune(self, now: float | None = None) -> bool:
        """Shred the previous key once its grace period is over; True if it did."""
        current = self._clock() if now is None else now
        if not self._path(PREVIOUS_KEY_FILE).exists() or current < self._delete_after():
            return False
        shredded = shred(self._path(PREVIOUS_KEY_FILE))
        self._path(PREVIOUS_META_FILE).unlink(missing_ok=True)
        return shredded

    def identities(self, now: float | None = None) -> list[NodeIdentity]:
        """Every key a packet may be addressed to now: current, pending, previous (after pruning)."""
        self.prune(now)
        keys = [self.current()]
        pending = self.pending()
        if pending is not None:
            keys.append(pending)
        previous = self.previous()
        if previous is not None:
            keys.append(previous[0])
        return keys

    def begin_rotation(self, now: float | None = None) -> NodeIdentity:
        """Make (or, after an interrupted rotation, reuse) the pending key and return it; publish it next.

        Refuses with :class:`RotationInProgress` while a previous key is still in its grace period: the node would
        otherwise have to drop a key that packets in flight may still use.
        """
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.current()
        self.prune(now)
        previous = self.previous()
        if previous is not None:
            raise RotationInProgress(previous[1])
        pending = self.pending()
        if pending is not None:
            return pending
        identity = NodeIdentity.generate()
        _write_secret(self._path(PENDING_KEY_FILE), identity.private_key)
        return identity

    def commit_rotation(self, now: float | None = None) -> NodeIdentity:
        """The pending key (published) becomes current; the old current key is kept for ``grace_s`` seconds."""
        pending_path = self._path(PENDING_KEY_FILE)
        if not pending_path.exists():
            raise IdentityError("no rotation in progress (no pending onion key)")
        retired_at = self._clock() if now is None else now
        meta = {"retired_at": retired_at, "delete_after": retired_at + self.grace_s}
        meta_tmp = self._path(PREVIOUS_META_FILE + ".tmp")
        meta_tmp.unlink(missing_ok=True)
        fd = os.open(meta_tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(meta, handle)
        # Order: the timing record first, then the old key into its place, then the new key: a crash in between
        # leaves every key on disk and :meth:`identities` still offers all of them.
        os.replace(meta_tmp, self._path(PREVIOUS_META_FILE))
        os.replace(self._path(KEY_FILE), self._path(PREVIOUS_KEY_FILE))
        os.replace(pending_path, self._path(KEY_FILE))
        return self.current()

    def abort_rotation(self) -> bool:
        """Shred the pending key (its transaction failed); True if there was one."""
        return shred(self._path(PENDING_KEY_FILE))

    def keyring(self) -> RotatingKeyring:
        """A keyring over this store for a running node."""
        return RotatingKeyring(self)


class RotatingKeyring(Mapping[bytes, "OnionKey"]):
    """Key id to onion key for :func:`node.privacy.peel`, re-read from an :class:`OnionKeyStore` by :meth:`reload`.

    Reloading swaps one inner dict for a new one, so a request that is peeling sees either the old set or the new set,
    never a half-updated one; a key's ``OnionKey`` (its precomputed ``cryptography`` object) is reused across reloads.
    """

    def __init__(self, store: OnionKeyStore) -> None:
        self._store = store
        self._keys: dict[bytes, OnionKey] = {}
        self.reload()

    def reload(self, now: float | None = None) -> None:
        """Re-read the store (pruning a previous key past its grace period first)."""
        from node.privacy import OnionKey  # the privacy layer (cryptography, numpy) only where keys are used

        by_secret = {k.secret: k for k in self._keys.values()}
        keys = [by_secret.get(i.private_key) or OnionKey(i.private_key) for i in self._store.identities(now)]
        self._keys = {k.key_id: k for k in keys}

    def __getitem__(self, key_id: bytes) -> OnionKey:
        return self._keys[key_id]

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"RotatingKeyring(key_ids={[k.hex() for k in self._keys]})"
