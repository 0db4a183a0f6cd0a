"""The privacy layer's errors: one base, and leaves named for what went wrong."""

from __future__ import annotations

import enum

from node._errors import PlanetServeError


class RejectReason(enum.StrEnum):
    """Why a packet, clove or reply chunk was rejected (``docs/protocol.md`` §3.3, §5.4, §5.6, §6, §7).

    Metrics count these; they are stable identifiers and never carry payload bytes.
    """

    TOO_SHORT = "too_short"
    OVERSIZED = "oversized"
    BAD_VERSION = "bad_version"
    BAD_TYPE = "bad_type"
    BAD_LENGTH = "bad_length"
    BAD_FIELD = "bad_field"
    BAD_KEY = "bad_key"
    UNKNOWN_KEY = "unknown_key"
    BAD_MAC = "bad_mac"
    BAD_SLOT = "bad_slot"
    BAD_PAYLOAD = "bad_payload"
    EXPIRED = "expired"
    REPLAY = "replay"
    INCONSISTENT = "inconsistent"
    OVERLOADED = "overloaded"
    NOT_EXIT = "not_exit"
    UNKNOWN_NEXT_HOP = "unknown_next_hop"
    UPSTREAM_FAILED = "upstream_failed"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    SLOW_BODY = "slow_body"


class PrivacyError(PlanetServeError):
    """Base of every error raised by ``node.privacy``."""

    code = "privacy_error"


class MalformedPacket(PrivacyError):
    """A clove, onion packet, envelope or reply chunk failed a check; ``reason`` says which.

    The message never includes the offending bytes.
    """

    code = "invalid_packet"

    def __init__(self, reason: RejectReason, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"rejected: {reason.value}" + (f" ({detail})" if detail else ""))


class NotEnoughCloves(PrivacyError):
    """Fewer than ``k`` distinct cloves were given to :func:`combine`."""

    code = "privacy_not_enough_cloves"

    def __init__(self, have: int, need: int) -> None:
        self.have = have
        self.need = need
        super().__init__(f"need {need} distinct cloves to rebuild the message, have {have}")


class InvalidPrivacyParam(PrivacyError):
    """A caller passed an out-of-range parameter (``param``, ``value``)."""

    code = "invalid_privacy_param"

    def __init__(self, param: str, value: object, expected: str) -> None:
        self.param = param
        self.value = value
        super().__init__(f"invalid {param}={value!r}: expected {expected}")


class InsufficientRelays(PrivacyError):
    """Path selection could not find enough eligible relays."""

    code = "network_insufficient_relays"

    def __init__(self, needed: int, available: int) -> None:
        self.needed = needed
        self.available = available
        super().__init__(f"need at least {needed} eligible relays with distinct operators, found {available}")


class ReplayJournalError(PrivacyError):
    """The replay journal file is not one (refusing to overwrite what may be someone else's file), or is not open."""

    code = "privacy_replay_journal"
