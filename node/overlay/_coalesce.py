"""Batch a byte stream in time: the first piece at once, then at most one batch per interval.

Why: a model node seals one reply chunk per batch and every chunk costs a frame on every path and a layer at every
relay, so one chunk per token makes the privacy cost grow with the reply length. Batching by time keeps the first
token immediate, bounds the added delay of any later byte to one interval, and also blurs per-token sizes, which
otherwise let an on-path observer guess token lengths (the padding of §6.1 hides less when a chunk is one token).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

#: Pieces buffered between the source and the batcher; a full buffer pauses the source (back-pressure).
_QUEUE_PIECES = 64


@dataclass(frozen=True, slots=True)
class _End:
    error: Exception | None


async def coalesce(source: AsyncIterator[bytes], interval_s: float, max_bytes: int) -> AsyncGenerator[bytes, None]:
    """Yield ``source``'s bytes in order, in batches at least ``interval_s`` apart (``0``: every piece as it comes).

    A batch goes out early once it holds ``max_bytes``. An exception from ``source`` is raised after the bytes it
    produced before failing have been yielded. Closing this generator cancels the reading of ``source``.
    """
    if interval_s <= 0:
        async for piece in source:
            yield piece
        return
    queue: asyncio.Queue[bytes | _End] = asyncio.Queue(maxsize=_QUEUE_PIECES)

    async def pump() -> None:
        try:
            async for piece in source:
                await queue.put(piece)
        except Exception as exc:  # handed to the consumer, which raises it in order
            await queue.put(_End(exc))
        else:
            await queue.put(_End(None))

    loop = asyncio.get_running_loop()
    task = loop.create_task(pump())
    buffer = bytearray()
    last_flush = -math.inf
    try:
        while True:
            if buffer:
                wait = last_flush + interval_s - loop.time()
                if wait <= 0 or len(buffer) >= max_bytes:
                    batch = bytes(buffer)
                    buffer.clear()
                    last_flush = loop.time()
                    yield batch
                    continue
                try:
                    async with asyncio.timeout(wait):
                        item = await queue.get()
                except TimeoutError:
                    continue  # the interval is over: flush what we have
            else:
                item = await queue.get()
            if isinstance(item, _End):
                if buffer:
                    yield bytes(buffer)
                if item.error is not None:
                    raise item.error
                return
            buffer += item
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
