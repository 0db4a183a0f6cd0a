"""A whole-request deadline over a stream of deltas.

Per-frame timeouts bound each wait, not the answer: a node that sends one token every few seconds stays within all of
them for as long as it likes. The OpenAI endpoint and ``ps-client ask``/``chat`` bound the whole answer with this.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TypeVar

from node.client._errors import RequestTimeout

T = TypeVar("T")


async def with_deadline(stream: AsyncIterator[T], seconds: float) -> AsyncGenerator[T, None]:
    """``stream``'s items until ``seconds`` after the first wait began; then :class:`RequestTimeout`. The stream is
    closed however this ends (its request released at once, not when the garbage collector finds it)."""
    end = asyncio.get_running_loop().time() + seconds
    iterator = aiter(stream)
    try:
        while True:
            try:
                async with asyncio.timeout_at(end):
                    item = await anext(iterator)
            except StopAsyncIteration:
                return
            except TimeoutError as exc:
                raise RequestTimeout(seconds) from exc
            yield item
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()
