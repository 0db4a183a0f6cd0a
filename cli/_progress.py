"""Progress of a long step loop (model training) on stderr: a rich bar with ETA on a terminal, plain lines otherwise.

stdout stays for the result. When stderr is not a terminal (a pipe, a CI log), a bar's redraws would be noise, so
one plain line is written at the first step, then at most every ``interval_s`` seconds, and at the last step: a log
of a few minutes' training stays a dozen lines.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from cli._durations import format_duration


class StepProgress:
    """Feed it ``update(done, total, loss)`` (the signature of ``node.inference.StepCallback``); use as a context."""

    def __init__(
        self, label: str, *, stream: TextIO | None = None, tty: bool | None = None, interval_s: float = 5.0
    ) -> None:
        self._label = label
        self._stream = stream if stream is not None else sys.stderr
        self._tty = self._stream.isatty() if tty is None else tty
        self._interval_s = interval_s
        self._started = time.monotonic()
        self._last_line = -float("inf")
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._first_step: tuple[int, float] | None = None

    def __enter__(self) -> StepProgress:
        self._started = time.monotonic()
        if self._tty:
            progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=Console(file=self._stream, force_terminal=True),
                transient=False,
            )
            progress.start()
            self._progress = progress
        return self

    def update(self, done: int, total: int, loss: float) -> None:
        """Record that ``done`` of ``total`` steps are finished, the last at ``loss``."""
        if self._progress is not None:
            if self._task is None:
                self._task = self._progress.add_task(self._label, total=total, loss="-")
            self._progress.update(self._task, completed=done, total=total, loss=f"{loss:.3f}")
            return
        now = time.monotonic()
        if done not in (1, total) and now - self._last_line < self._interval_s:
            return
        self._last_line = now
        if self._first_step is None:
            self._first_step = (done, now)
        elapsed = now - self._started
        # The rate is measured from the first step on: what came before it (tokenizer, corpus) is not step time.
        first_done, first_at = self._first_step
        eta = (
            "?"
            if done <= first_done
            else format_duration(round((now - first_at) / (done - first_done) * (total - done)))
        )
        percent = 100 * done // max(1, total)
        self._stream.write(
            f"{self._label}: step {done}/{total} ({percent}%) loss {loss:.3f}, "
            f"elapsed {format_duration(round(elapsed))}, ETA {eta}\n"
        )
        self._stream.flush()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.stop()
