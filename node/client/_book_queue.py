"""One ordered worker thread for every read and write of a wallet's book.

Why one thread and not ``asyncio.to_thread``: a book write is an SQLite commit with an fsync (about 12 ms, longer
while another process of the client holds the write lock), so it must leave the event loop; but the writes must also
happen in the order they were asked for. A request that finished settles its reservation (``in_flight`` down,
``owed`` up), and the next voucher on that channel is computed from those two numbers: signed before the settle,
it would promise the finished request's whole reservation again. Worker threads of a pool run in any order; one
thread taking jobs from one FIFO queue runs them exactly in submission order, so a job submitted after another
always sees its effects.

Callers on the event loop either wait for a job without blocking the loop (:meth:`BookQueue.run`), or leave it
behind (:meth:`BookQueue.post`, what ``Wallet.finish`` does: it stays synchronous for its callers). A posted job's
exception has nobody to raise to: it is logged and kept, and :meth:`BookQueue.failures` hands it on (the wallet
raises it from ``drain``/``close``). Closing drains the queue first, with a timeout, so nothing queued is lost.

The queue is bounded (``MAX_QUEUED`` jobs): a request has at most three book jobs queued at a time (its voucher,
its settle, a release), so the bound is reached only by thousands of concurrent requests; a full queue makes the
submitter wait (back-pressure) up to ``SUBMIT_TIMEOUT_S``, then raises ``BookBusy``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from node.client._errors import ClientError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Most jobs waiting for the book's thread at once.
MAX_QUEUED = 4096
#: Longest a submitter waits for room in a full queue, seconds.
SUBMIT_TIMEOUT_S = 30.0
#: Longest :meth:`BookQueue.close` waits for the jobs already queued, seconds (a write may wait up to
#: ``BUSY_TIMEOUT_S`` for another process's lock on the book, so a few of them fit).
DRAIN_TIMEOUT_S = 30.0
#: Longest a synchronous :meth:`BookQueue.call` waits for its job (queued behind others, each bounded by the book's
#: ``BUSY_TIMEOUT_S``), seconds; then ``BookBusy`` (the job may still run later).
CALL_TIMEOUT_S = 120.0
#: Failures of posted jobs kept until someone collects them (the first ones: they say what went wrong first).
MAX_KEPT_FAILURES = 16

_Job = tuple[concurrent.futures.Future[Any], Callable[[], Any]]


class BookBusy(ClientError):
    """The wallet's book did not accept a job in time (its queue stayed full, or the wallet is closed)."""

    code = "payment_book_busy"

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"the wallet's book is unavailable: {reason}")


def _work(jobs: queue.Queue[_Job | None]) -> None:
    """The book's thread: run jobs in order until the stop marker (holds no reference to the queue's owner)."""
    while True:
        job = jobs.get()
        if job is None:
            return
        future, call = job
        del job  # while waiting for the next job, hold nothing of the last one (it may keep its wallet alive)
        if future.set_running_or_notify_cancel():
            try:
                result = call()
            except BaseException as exc:  # handed to whoever waits on the future (or logged by post's callback)
                future.set_exception(exc)
            else:
                future.set_result(result)
                del result
        del future, call


class BookQueue:
    """Runs callables one at a time, in submission order, on one daemon thread named ``name``."""

    def __init__(self, name: str, *, max_queued: int = MAX_QUEUED) -> None:
        self._jobs: queue.Queue[_Job | None] = queue.Queue(max_queued)
        self._thread = threading.Thread(target=_work, args=(self._jobs,), name=name, daemon=True)
        self._closed = False
        self._failures: list[BaseException] = []
        self._failed = 0
        self._guard = threading.Lock()
        self._thread.start()

    def __repr__(self) -> str:
        return f"BookQueue(name={self._thread.name}, queued={self._jobs.qsize()}, closed={self._closed})"

    @property
    def closed(self) -> bool:
        """True once :meth:`close` started: nothing more is accepted."""
        return self._closed

    def on_thread(self) -> bool:
        """True when called from the book's own thread (a job submitting and waiting there would deadlock)."""
        return threading.current_thread() is self._thread

    def submit(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        """Queue ``call(*args, **kwargs)`` after every job submitted before; its future. ``BookBusy`` when closed
        or when the queue stays full for ``SUBMIT_TIMEOUT_S``."""
        if self._closed:
            raise BookBusy("the wallet is closed")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        try:
            self._jobs.put((future, lambda: call(*args, **kwargs)), timeout=SUBMIT_TIMEOUT_S)
        except queue.Full:
            raise BookBusy(f"{self._jobs.maxsize} jobs queued for {SUBMIT_TIMEOUT_S:g} s") from None
        return future

    def call(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``call`` in order and wait for its result (blocking: for threads and synchronous callers; directly
        when already on the book's thread)."""
        if self.on_thread():
            return call(*args, **kwargs)
        try:
            return self.submit(call, *args, **kwargs).result(timeout=CALL_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            raise BookBusy(f"a job waited over {CALL_TIMEOUT_S:g} s for its turn") from None

    async def run(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``call`` in order and await its result without blocking the event loop (no timeout of its own: the
        job ends within the book's ``BUSY_TIMEOUT_S``, the queue is bounded, and callers bound their requests)."""
        return await asyncio.wrap_future(self.submit(call, *args, **kwargs))

    def post(self, what: str, call: Callable[..., object], *args: Any, **kwargs: Any) -> None:
        """Queue ``call`` and return at once. If it raises, the error is logged (``what`` names the job: no amounts
        beyond wei, no keys) and kept for :meth:`failures`."""
        try:
            future = self.submit(call, *args, **kwargs)
        except BookBusy as exc:
            self._fail(what, exc)
            return
        future.add_done_callback(lambda done: self._collect(what, done))

    def _collect(self, what: str, done: concurrent.futures.Future[Any]) -> None:
        if done.cancelled():
            return
        error = done.exception()
        if error is not None:
            self._fail(what, error)

    def _fail(self, what: str, error: BaseException) -> None:
        log.error("wallet book: %s failed: %s: %s", what, type(error).__name__, error)
        with self._guard:
            self._failed += 1
            if len(self._failures) < MAX_KEPT_FAILURES:
                self._failures.append(error)

    def failures(self) -> tuple[int, list[BaseException]]:
        """How many posted jobs failed since the last call, and the first of their errors (then forgotten)."""
        with self._guard:
            count, kept = self._failed, self._failures
            self._failed, self._failures = 0, []
        return count, kept

    def drain(self, timeout: float = DRAIN_TIMEOUT_S) -> bool:
        """Wait until every job submitted so far has run; False when ``timeout`` seconds passed first."""
        if self.on_thread():
            raise RuntimeError("drain() from the book's own thread would wait for itself")
        if not self._thread.is_alive():
            return self._jobs.empty()
        marker: concurrent.futures.Future[None] = concurrent.futures.Future()
        deadline = time.monotonic() + timeout
        try:
            self._jobs.put((marker, lambda: None), timeout=timeout)
        except queue.Full:
            return False
        try:
            marker.result(timeout=max(0.0, deadline - time.monotonic()))
        except concurrent.futures.TimeoutError:
            return False
        return True

    async def adrain(self, timeout: float = DRAIN_TIMEOUT_S) -> bool:
        """:meth:`drain` for the event loop: waits in a worker thread."""
        return await asyncio.to_thread(self.drain, timeout)

    def close(self, timeout: float = DRAIN_TIMEOUT_S) -> bool:
        """Refuse new jobs, run the queued ones (up to ``timeout`` seconds) and stop the thread; True when every
        queued job ran. Idempotent."""
        if self._closed:
            return not self._thread.is_alive()
        self._closed = True  # first: a job submitted from here on is refused, not left behind the stop marker
        if self.on_thread():  # from a job (e.g. a finalizer run by the collector there): stop after the queued ones
            try:
                self._jobs.put_nowait(None)
            except queue.Full:
                return False
            return True
        drained = self.drain(timeout)
        try:
            self._jobs.put(None, timeout=max(0.1, timeout))
        except queue.Full:
            return False
        self._thread.join(timeout if drained else 0.1)
        if not drained:
            log.error("wallet book: queued writes were still running after %g s at close", timeout)
        return drained and not self._thread.is_alive()
