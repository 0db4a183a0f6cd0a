"""Configuration of an overlay node (relay or model-node side)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from node.privacy import InvalidPrivacyParam, OnionKeyring, public_key
from node.privacy._constants import MAX_PACKET


@dataclass(frozen=True, slots=True)
class OverlayConfig:
    """Limits and keys of one overlay node. Every wait has a timeout and every buffer a bound, set here."""

    x25519_secret: bytes = field(repr=False)
    """The node's raw 32-byte X25519 secret (its public key is on chain). Never printed."""
    role: Literal["relay", "model"] = "relay"
    """``relay`` forwards only; ``model`` also accepts EXIT packets and serves them through a handler."""
    max_body: int = MAX_PACKET
    """Largest request body accepted, bytes (the largest onion packet)."""
    max_inflight: int = 256
    """Most requests handled at once; more are rejected with 503 ``overloaded``."""
    body_timeout_s: float = 10.0
    """Most seconds a peer may take to send a whole packet: a slow sender must not hold one of the in-flight slots."""
    header_timeout_s: float = 20.0
    """Most seconds a connection may take to send a request's headers (from connecting, or from the end of its last
    response), and the longest a kept-alive connection may sit idle: a client that trickles header bytes is cut off.
    Above the usual 15 s client keep-alive, so that clients, not this server, close idle pooled connections."""
    connect_timeout_s: float = 10.0
    """Seconds to connect to the next hop."""
    dial_private_addresses: bool = True
    """Whether this node may connect to loopback, private, link-local and other non-public addresses. A registered
    endpoint names any host, and a relay forwards bytes its sender chose: False makes this node refuse (at connect
    time, after name resolution) any next hop that is not a public address, so that no registrant can point it at a
    service on its own host or network. True for networks on one host or a LAN (tests, the demo, ``ps-net``)."""
    upstream_headers_timeout_s: float = 40.0
    """Seconds to wait for the next hop's response headers (must exceed the destination's assembly timeout)."""
    idle_timeout_s: float = 30.0
    """Most seconds from one whole reply frame to the next before a reply stream is abandoned (a relay times every
    frame, not every byte, so a next hop that answers 200 and then trickles bytes frees the slot within this)."""
    circuit_lifetime_s: float = 900.0
    """Most seconds one forwarded exchange (request plus whole reply stream) may last."""
    replay_capacity: int = 200_000
    """Replay-cache entries (16-byte tags, kept until packet expiry)."""
    replay_journal: Path | None = None
    """File that keeps the replay cache across restarts (``ps-node serve``: in the state directory); ``None``: memory
    only, so a restarted node would accept again, for up to ``MAX_TTL`` seconds, packets it saw before."""
    assembly_timeout_s: float = 5.0
    """Model side: seconds a message with fewer than k cloves is kept (and its cloves' paths wait) after its first
    clove. Short: the k cloves of an honest message are sent at once and arrive within path-latency differences,
    while a lone clove otherwise holds a table entry and an in-flight slot for nothing."""
    max_incomplete_per_source: int = 16
    """Model side: most messages still short of k cloves that one source (the previous hop's IP address) may have
    started; a source's next one evicts its own oldest. One flooding peer cannot then fill the message table."""
    max_messages: int = 256
    """Model side: messages being assembled or replied to at once (memory: up to n cloves of 128 KiB each)."""
    message_linger_s: float = 30.0
    """Model side: seconds a finished message's reply stays available to late cloves."""
    max_backlog_frames: int = 8192
    """Model side: most reply chunks kept per message (for paths that join late)."""
    reply_timeout_s: float = 900.0
    """Model side: most seconds the handler may take to produce the whole reply."""
    reply_flush_interval_s: float = 0.02
    """Model side: reply bytes are sealed in batches at least this far apart (the first at once); 0: one chunk per
    piece the handler yields. Fewer chunks cost every path and relay less and hide per-token sizes better."""
    reply_start_jitter_s: float = 0.005
    """Model side: each path waits a random 0..this many seconds before answering 200 and sending its first frame
    (``docs/protocol.md`` §6.3), so the paths of one request do not start at one instant; 0 turns it off."""
    onion_keyring: OnionKeyring | None = field(default=None, repr=False, compare=False)
    """The keys ``peel`` looks packets' key ids up in, when they rotate (``node.RotatingKeyring`` from the state
    directory in ``ps-node serve``); ``None``: ``x25519_secret`` alone. Must hold ``x25519_secret``'s key."""
    keyring_reload_s: float = 2.0
    """Seconds between reloads of ``onion_keyring`` when it has a ``reload()`` method: how soon a running node
    starts accepting a rotation's new key and forgets an old one whose grace period is over (no restart needed)."""
    _public: bytes = field(init=False, repr=False, compare=False, default=b"")

    def __post_init__(self) -> None:
        if len(self.x25519_secret) != 32:
            raise InvalidPrivacyParam("x25519_secret", len(self.x25519_secret), "32 bytes")
        if self.role not in ("relay", "model"):
            raise InvalidPrivacyParam("role", self.role, "relay or model")
        if not (0 <= self.reply_flush_interval_s <= 1):
            raise InvalidPrivacyParam("reply_flush_interval_s", self.reply_flush_interval_s, "0..1 seconds")
        if not (0 <= self.reply_start_jitter_s <= 1):
            raise InvalidPrivacyParam("reply_start_jitter_s", self.reply_start_jitter_s, "0..1 seconds")
        for name in (
            "max_body",
            "max_inflight",
            "replay_capacity",
            "max_messages",
            "max_backlog_frames",
            "max_incomplete_per_source",
        ):
            if getattr(self, name) < 1:
                raise InvalidPrivacyParam(name, getattr(self, name), "at least 1")
        for name in (
            "body_timeout_s",
            "header_timeout_s",
            "connect_timeout_s",
            "upstream_headers_timeout_s",
            "idle_timeout_s",
            "circuit_lifetime_s",
            "assembly_timeout_s",
            "reply_timeout_s",
            "keyring_reload_s",
        ):
            if not getattr(self, name) > 0:
                raise InvalidPrivacyParam(name, getattr(self, name), "more than 0 seconds")
        # Derived once: a scalar multiplication is too costly to repeat per request.
        object.__setattr__(self, "_public", public_key(self.x25519_secret))

    @property
    def x25519_public(self) -> bytes:
        """The node's raw X25519 public key."""
        return self._public
