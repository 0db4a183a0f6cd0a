"""Per-request cost, collected where the ``Client`` settles a payment and read where the answer is shaped.

A context variable rather than a return value: the ``Client`` streams deltas and settles a payment in its
generator's ``finally``, after the last delta; the caller (the OpenAI endpoint) opens a :func:`billing` block around
the whole stream and reads the bill once the stream is exhausted or closed. Dependency-free on purpose: the endpoint
imports it without pulling in the chain libraries.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(slots=True)
class Bill:
    """What the requests made inside one :func:`billing` block cost (the OpenAI endpoint's ``usage`` fields)."""

    cost_wei: int = 0
    """Wei the client counts as spent on them (actual tokens at the node's price; a whole reservation when a reply
    broke after the node had the request)."""
    price_per_1k_tokens: int = 0
    """The price of the last paid node, wei per 1000 tokens (0: no paid node answered)."""
    payments: int = 0
    """Vouchers signed (a retry that never reached its node counts here, but costs nothing)."""


_BILL: ContextVar[Bill | None] = ContextVar("planetserve_wallet_bill", default=None)


@contextmanager
def billing() -> Iterator[Bill]:
    """Collect, into the yielded :class:`Bill`, what every request paid by any wallet in this context costs.

    A context variable rather than a return value: the ``Client`` streams deltas and settles in its generator's
    ``finally``; the caller reads the bill once the stream is exhausted (or closed).
    """
    bill = Bill()
    token = _BILL.set(bill)
    try:
        yield bill
    finally:
        _BILL.reset(token)


def bill_payment() -> None:
    """A voucher was signed for a try of the current request."""
    bill = _BILL.get()
    if bill is not None:
        bill.payments += 1


def bill_spent(wei: int, price_per_1k_tokens: int | None) -> None:
    """A try of the current request ended having cost ``wei``; ``price_per_1k_tokens`` is its node's price, or
    None when that node never had the request."""
    bill = _BILL.get()
    if bill is not None:
        bill.cost_wei += wei
        if price_per_1k_tokens is not None:
            bill.price_per_1k_tokens = price_per_1k_tokens
