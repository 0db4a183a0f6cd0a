"""The privacy layer: S-IDA cloves, Sphinx-like onion packets, reply chunks, replay cache and path selection.

Wire formats are specified in ``docs/protocol.md``. Everything here is pure and synchronous; the overlay
(``node.overlay``) does the networking.
"""

from node.privacy._errors import (
    InsufficientRelays,
    InvalidPrivacyParam,
    MalformedPacket,
    NotEnoughCloves,
    PrivacyError,
    RejectReason,
    ReplayJournalError,
)
from node.privacy._keys import OnionKey, OnionKeyring, key_id, keyring
from node.privacy._onion import BuiltOnion, Hop, PeeledExit, PeeledForward, build_onion, peel
from node.privacy._paths import RelayDescriptor, select_paths
from node.privacy._replay import ReplayCache, ReplayJournal
from node.privacy._reply import Envelope, ReplyChunk, open_reply, seal_reply
from node.privacy._sida import Clove, combine, split
from node.privacy._x25519 import public_key

__all__ = [
    "BuiltOnion",
    "Clove",
    "Envelope",
    "Hop",
    "InsufficientRelays",
    "InvalidPrivacyParam",
    "MalformedPacket",
    "NotEnoughCloves",
    "OnionKey",
    "OnionKeyring",
    "PeeledExit",
    "PeeledForward",
    "PrivacyError",
    "RejectReason",
    "RelayDescriptor",
    "ReplayCache",
    "ReplayJournal",
    "ReplayJournalError",
    "ReplyChunk",
    "build_onion",
    "combine",
    "key_id",
    "keyring",
    "open_reply",
    "peel",
    "public_key",
    "seal_reply",
    "select_paths",
    "split",
]
