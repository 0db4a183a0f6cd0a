"""Time-batching of reply bytes: the first piece at once, later ones merged per interval, nothing lost or reordered."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator

import pytest

from node.overlay._coalesce import coalesce


async def _timed(pieces: list[tuple[float, bytes]], fail: Exception | None = None) -> AsyncIterator[bytes]:
    """Yields each piece after its delay (seconds)."""
    for delay, piece in pieces:
        await asyncio.sleep(delay)
        yield piece
    if fail is not None:
        raise fail


async def _collect(stream: AsyncIterator[bytes]) -> list[tuple[float, bytes]]:
    loop = asyncio.get_running_loop()
    start = loop.time()
    return [(loop.time() - start, batch) async for batch in stream]


async def test_first_piece_goes_at_once_and_a_burst_is_one_batch() -> None:
    burst = [(0.0, b"a"), *[(0.0, bytes([98 + i])) for i in range(10)]]
    batches = await _collect(coalesce(_timed(burst), 0.2, 1 << 14))
    assert batches[0][1] == b"a" and batches[0][0] < 0.1
    assert b"".join(b for _, b in batches) == b"abcdefghijk"
    assert len(batches) == 2  # the rest of the burst waits for the interval, then goes together


async def test_a_trailing_piece_is_flushed_by_the_timer_without_new_input() -> None:
    loop = asyncio.get_running_loop()
    source = _timed([(0.0, b"x"), (0.0, b"y"), (2.0, b"z")])
    stream = coalesce(source, 0.1, 1 << 14)
    start = loop.time()
    assert await anext(stream) == b"x"
    assert await anext(stream) == b"y"
    assert loop.time() - start < 1.0  # "y" did not wait for "z"
    assert await anext(stream) == b"z"
    await stream.aclose()


async def test_batches_never_come_closer_than_the_interval() -> None:
    pieces = [(0.01, b"%d," % i) for i in range(30)]
    batches = await _collect(coalesce(_timed(pieces), 0.05, 1 << 14))
    assert b"".join(b for _, b in batches) == b"".join(p for _, p in pieces)
    gaps = [later - earlier for (earlier, _), (later, _) in itertools.pairwise(batches)]
    assert len(batches) < len(pieces)
    assert all(gap >= 0.045 for gap in gaps[:-1])  # the last batch is flushed as soon as the source ends


async def test_a_full_batch_goes_early() -> None:
    pieces = [(0.0, b"0123456789")] * 5
    batches = await _collect(coalesce(_timed(pieces), 10.0, 16))
    assert b"".join(b for _, b in batches) == b"0123456789" * 5
    assert batches[-1][0] < 1.0


async def test_zero_interval_passes_every_piece_through() -> None:
    pieces = [(0.0, b"a"), (0.0, b"b"), (0.0, b"c")]
    assert [b for _, b in await _collect(coalesce(_timed(pieces), 0.0, 16))] == [b"a", b"b", b"c"]


async def test_a_failing_source_delivers_what_it_made_then_raises() -> None:
    received: list[bytes] = []
    with pytest.raises(RuntimeError, match="engine died"):
        async for batch in coalesce(_timed([(0.0, b"a"), (0.0, b"b")], RuntimeError("engine died")), 0.5, 16):
            received.append(batch)
    assert b"".join(received) == b"ab"


async def test_closing_the_batcher_stops_reading_the_source() -> None:
    closed = asyncio.Event()

    async def endless() -> AsyncIterator[bytes]:
        try:
            while True:
                await asyncio.sleep(0.01)
                yield b"."
        finally:
            closed.set()

    async with contextlib.aclosing(coalesce(endless(), 0.05, 16)) as stream:
        assert await anext(stream) == b"."
    async with asyncio.timeout(1):
        await closed.wait()
