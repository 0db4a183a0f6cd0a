"""Wei amounts as a SQL column type: ``NUMERIC(78,0)`` on PostgreSQL, an order-preserving string on SQLite.

Why: wei values reach 2**256 - 1 (78 decimal digits). SQLite integers are 64-bit and its ``SUM`` and comparisons on
text fall back to floating point, so a plain decimal string sorts ``"9" > "10"`` and sums lose precision above 2**53.
PostgreSQL has an exact ``NUMERIC(78,0)``, which holds every uint256 (and its negation, for signed deltas), sorts and
sums exactly in SQL. On every other database the value is stored as a fixed-width, zero-padded decimal string, so
lexical order is numeric order and ``ORDER BY``/``MIN``/``MAX``/comparisons in SQL stay correct; sums are done in
Python (:func:`sum_wei`), exactly.

Signed amounts (stake deltas) on the string encoding: ``p`` + 78 digits for ``v >= 0`` and ``n`` + the 78-digit
complement ``10**78 - |v|`` for ``v < 0`` (``"n" < "p"``, and a larger ``|v|`` gives a smaller complement), so the
order is numeric too. Non-negative values stay readable.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from sqlalchemy import ColumnElement, Dialect, Numeric, String, func, select
from sqlalchemy.orm import Mapped, Session
from sqlalchemy.types import TypeDecorator, TypeEngine

#: Decimal digits of the largest uint256 (2**256 - 1 has 78).
WEI_DIGITS = 78
_LIMIT = 2**256
_COMPLEMENT: int = 10**WEI_DIGITS


def _uses_numeric(dialect: Dialect) -> bool:
    return dialect.name == "postgresql"


class WeiAmount(TypeDecorator[int]):
    """An integer amount in wei in ``[0, 2**256)`` (``signed=True``: ``(-2**256, 2**256)``), exact on every database."""

    impl = String(WEI_DIGITS + 1)
    cache_ok = True

    def __init__(self, *, signed: bool = False) -> None:
        super().__init__()
        self.signed = signed

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if _uses_numeric(dialect):
            return dialect.type_descriptor(Numeric(WEI_DIGITS, 0))
        return dialect.type_descriptor(String(WEI_DIGITS + 1))

    def process_bind_param(self, value: int | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"a wei amount must be an int, not {type(value).__name__}")
        in_range = -_LIMIT < value < _LIMIT if self.signed else 0 <= value < _LIMIT
        if not in_range:
            raise ValueError(f"wei amount out of range for a {'signed ' if self.signed else ''}uint256 column")
        if _uses_numeric(dialect):
            return Decimal(value)
        return encode_wei(value, signed=self.signed)

    def process_result_value(self, value: Any, dialect: Dialect) -> int | None:
        if value is None:
            return None
        if isinstance(value, str):
            return decode_wei(value)
        return int(value)  # Decimal from NUMERIC (exact; scale 0)

    @property
    def python_type(self) -> type[int]:
        return int


def encode_wei(value: int, *, signed: bool = False) -> str:
    """The order-preserving string form of ``value`` (see the module docstring)."""
    if not signed:
        return str(value).zfill(WEI_DIGITS)
    if value >= 0:
        return "p" + str(value).zfill(WEI_DIGITS)
    return "n" + str(_COMPLEMENT + value).zfill(WEI_DIGITS)


def decode_wei(text: str) -> int:
    """Inverse of :func:`encode_wei` (also reads legacy plain decimal strings)."""
    if text.startswith("p"):
        return int(text[1:])
    if text.startswith("n"):
        return int(text[1:]) - _COMPLEMENT
    return int(text)


def sum_wei(session: Session, column: Mapped[int] | ColumnElement[int], *criteria: ColumnElement[bool]) -> int:
    """The exact sum of a :class:`WeiAmount` column over the rows matching ``criteria`` (0 when none).

    In SQL on PostgreSQL (NUMERIC is exact); in Python elsewhere, since SQLite would sum the strings as floats.
    """
    bind = session.get_bind()
    if _uses_numeric(bind.dialect):
        total = session.execute(select(func.sum(column)).where(*criteria)).scalar_one()
        return 0 if total is None else int(total)
    values = session.execute(select(column).where(*criteria)).scalars()
    return sum(int(v) for v in values if v is not None)
