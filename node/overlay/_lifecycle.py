"""Shutting several things down: every one of them, whatever one raises.

Why this exists: ``for x in things: await x.stop()`` gives up at the first failure and leaves every later thing
running (a listening port, a background task, an open client session or database file), found by the garbage
collector at some later point (a ``ResourceWarning``, an error where warnings are errors) or never.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable

log = logging.getLogger(__name__)


async def stop_all(stops: Iterable[Callable[[], Awaitable[object]]]) -> None:
    """Await every one of ``stops`` in order, whatever one raises (cancellation included), then raise the first
    error; the later ones are logged by type (their text may name a peer)."""
    first: BaseException | None = None
    for stop in stops:
        try:
            await stop()
        except BaseException as exc:  # every stop runs; the first error is raised below
            if first is None:
                first = exc
            else:
                log.warning("another stop failed too: %s", type(exc).__name__)
    if first is not None:
        raise first
