"""Chain times read as durations and UTC dates, in revert messages and command output."""

from __future__ import annotations

from cli._durations import describe_error, describe_time, format_duration, format_instant
from ledger import ContractRevert, TransactionFailed

# 2026-12-01 14:00:00 UTC
NOON_ISH = 1_796_133_600


def test_durations_read_as_days_hours_minutes() -> None:
    assert format_duration(0) == "0s" and format_duration(59) == "59s" and format_duration(-5) == "0s"
    assert format_duration(60) == "1m 0s" and format_duration(245) == "4m 5s" and format_duration(3_600) == "1h 0m"
    assert format_duration(86_340) == "23h 59m" and format_duration(93_784) == "1d 2h 3m"
    assert format_instant(NOON_ISH) == "2026-12-01 14:00 UTC"
    assert describe_time(NOON_ISH + 86_340, NOON_ISH) == "in 23h 59m (2026-12-02 13:59 UTC)"
    assert describe_time(NOON_ISH - 120, NOON_ISH) == "2m 0s ago (2026-12-01 13:58 UTC)"


class UnbondingNotFinished(ContractRevert):
    error_name = "NodeRegistryUnbondingNotFinished"


def test_revert_times_are_measured_on_the_chain_clock_it_carries() -> None:
    exc = UnbondingNotFinished(
        {"operator": "0xabc", "unbondingEndsAt": NOON_ISH + 86_340, "currentTime": NOON_ISH}, tx_hash=None
    )
    assert str(exc).count(str(NOON_ISH)) == 1  # the library's own text holds raw Unix times
    line = describe_error(exc)
    assert line == (
        "transaction reverted: NodeRegistryUnbondingNotFinished(operator=0xabc, "
        "unbondingEndsAt=in 23h 59m (2026-12-02 13:59 UTC), currentTime=2026-12-01 14:00 UTC)"
    )
    assert str(NOON_ISH) not in line
    plain = TransactionFailed("boom")
    assert describe_error(plain) == "boom"
