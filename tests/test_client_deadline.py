"""The whole-request deadline (``node.client.with_deadline``) that the OpenAI endpoint and ``ps-client ask``/``chat``
put over a reply: a node trickling tokens within every per-frame timeout is still cut off, and the stream is closed
at once (its request released), not when the garbage collector finds it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator

import pytest

from cli.exit_codes import ExitCode
from node.client import RequestTimeout, with_deadline
from tests._procs import run_cli


async def test_a_trickling_stream_is_cut_at_the_deadline_and_closed() -> None:
    closed = asyncio.Event()
    sent: list[int] = []

    async def trickle() -> AsyncGenerator[int, None]:
        try:
            for i in range(1_000):
                await asyncio.sleep(0.05)  # each wait short: no per-frame timeout would fire
                sent.append(i)
                yield i
        finally:
            closed.set()

    got: list[int] = []
    started = time.monotonic()
    with pytest.raises(RequestTimeout, match=r"0\.5 s"):
        async for item in with_deadline(trickle(), 0.5):
            got.append(item)
    assert time.monotonic() - started < 5.0
    assert closed.is_set() and 0 < len(got) < 1_000 and got == sent[: len(got)]


async def test_a_stream_that_ends_in_time_is_passed_through_whole() -> None:
    async def three() -> AsyncGenerator[int, None]:
        for i in range(3):
            yield i

    assert [i async for i in with_deadline(three(), 5.0)] == [0, 1, 2]


@pytest.mark.parametrize("command", ["ask", "chat"])
def test_a_timeout_out_of_range_is_a_usage_error(command: str) -> None:
    done = run_cli("client", [command, "1+1=", "--model", "m@1", "--timeout", "0"])
    assert done.returncode == ExitCode.USAGE, done.stderr
    assert "--timeout" in done.stderr and "Traceback" not in done.stderr
