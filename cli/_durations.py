"""Chain times as people read them: a duration from now and a UTC date, never a bare Unix time.

Revert errors carry Unix times (``unbondingEndsAt``) and sometimes the chain's own clock (``currentTime``); the chain
clock is what counts (``ps-chain advance`` moves it), so a duration is taken from it when the error carries it.
"""

from __future__ import annotations

import datetime as dt
import time

from node import PlanetServeError

#: Revert argument names that hold the chain's current time (seconds since the epoch).
_NOW_FIELDS = ("currentTime", "now", "timestamp")


def format_duration(seconds: int) -> str:
    """``93784`` → ``1d 2h 3m``; under an hour with seconds (``4m 5s``, ``45s``); negative durations read as ``0s``."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    days, rest = divmod(seconds, 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes = rest // 60
    parts = [f"{days}d"] if days else []
    if hours or days:
        parts.append(f"{hours}h")
    parts.append(f"{minutes}m")
    if not (days or hours):
        parts.append(f"{rest % 60}s")
    return " ".join(parts)


def format_instant(unix: int) -> str:
    """``1796220000`` → ``2026-12-02 14:00 UTC``."""
    return dt.datetime.fromtimestamp(int(unix), tz=dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def describe_time(unix: int, now: int | None = None) -> str:
    """``in 23h 59m (2026-12-02 14:00 UTC)`` or ``23h 59m ago (…)``, from ``now`` (the chain's clock) or the wall."""
    if unix == 0:
        return "never (0)"
    reference = int(time.time()) if now is None else int(now)
    delta = int(unix) - reference
    when = f"in {format_duration(delta)}" if delta >= 0 else f"{format_duration(-delta)} ago"
    return f"{when} ({format_instant(unix)})"


#: Revert argument names that hold a Unix time without saying so in a suffix (OpenZeppelin's admin-rules errors).
_TIME_NAMES = frozenset({"schedule", "acceptSchedule"})


def _is_time_field(name: str) -> bool:
    return name in _TIME_NAMES or name.endswith(("At", "_at", "Until", "Deadline"))


def describe_error(exc: PlanetServeError) -> str:
    """``str(exc)``, except that a decoded revert's time arguments read as durations and dates.

    ``NodeRegistryUnbondingNotFinished(operator=0x…, unbondingEndsAt=1796220000, currentTime=1796133660)`` reads
    ``… unbondingEndsAt=in 23h 59m (2026-12-02 14:00 UTC), currentTime=2026-12-01 14:01 UTC``.
    """
    values = getattr(exc, "values", None)
    name = getattr(exc, "error_name", None)
    if not isinstance(values, dict) or not isinstance(name, str) or not name:
        return str(exc)
    now = next((int(values[f]) for f in _NOW_FIELDS if isinstance(values.get(f), int)), None)
    rendered = []
    for key, value in values.items():
        if isinstance(value, int) and not isinstance(value, bool) and _is_time_field(key):
            text = describe_time(value, now)
        elif key in _NOW_FIELDS and isinstance(value, int):
            text = format_instant(value)
        elif isinstance(value, bytes):
            text = "0x" + value.hex()
        elif hasattr(value, "name") and not isinstance(value, (str, int)):
            text = str(value.name).lower()
        else:
            text = str(value)
        rendered.append(f"{key}={text}")
    return f"transaction reverted: {name}({', '.join(rendered)})"
