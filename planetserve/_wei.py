"""Amounts of ether in wei: an ``int`` type and the exact ETH text form people type and read.

Why an ``int`` ``NewType`` and not a class: wei amounts are summed, compared and ABI-encoded as plain integers
everywhere; a ``NewType`` costs nothing at run time and still lets mypy tell an amount from a count. ETH text is
parsed with ``Decimal`` and never a float, so ``0.1`` ETH is exactly ``10**17`` wei.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import NewType

from planetserve._errors import InvalidValue

#: An amount of ether in wei (1 ether = 10**18 wei), in ``[0, 2**256)`` where it reaches the chain. Never a float.
Wei = NewType("Wei", int)

#: Wei in one ether.
WEI_PER_ETH = 10**18
#: The largest amount a uint256 holds.
MAX_WEI = 2**256 - 1


def parse_eth(text: str | int | Decimal, *, param: str = "amount") -> Wei:
    """An ETH amount (``"1.5"``) to wei, exactly; rejects negatives, NaN, more than 18 decimals and > uint256."""
    if isinstance(text, bool):
        raise InvalidValue(param, text, "not a number of ETH")
    try:
        value = Decimal(str(text).strip())
    except InvalidOperation:
        raise InvalidValue(param, text, "not a number of ETH") from None
    if not value.is_finite() or value < 0:
        raise InvalidValue(param, text, "must be a non-negative number of ETH")
    wei = value * WEI_PER_ETH
    if wei != wei.to_integral_value():
        raise InvalidValue(param, text, "more than 18 decimal places")
    if wei > MAX_WEI:
        raise InvalidValue(param, text, "larger than any amount a uint256 holds")
    return Wei(int(wei))


def format_eth(amount: int) -> str:
    """Wei to a plain ETH string without float rounding (``1500000000000000000`` -> ``"1.5"``)."""
    sign, amount = ("-", -amount) if amount < 0 else ("", amount)
    whole, frac = divmod(amount, WEI_PER_ETH)
    return sign + (f"{whole}.{frac:018d}".rstrip("0").rstrip(".") if frac else str(whole))
