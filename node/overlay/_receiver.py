"""The model-node side: collect cloves per message, rebuild the request from any k, run a handler, and stream its
reply back on every path that delivered a clove (``docs/protocol.md`` §3.3, §4, §6.1).

Reusable: the inference engine plugs in as ``handler: async (request_bytes) -> AsyncIterator[bytes]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from aiohttp import web

from node.overlay._coalesce import coalesce
from node.overlay._config import OverlayConfig
from node.overlay._metrics import OverlayMetrics
from node.privacy import Clove, Envelope, MalformedPacket, PrivacyError, RejectReason, combine, seal_reply
from node.privacy._constants import MAX_REPLY_DATA
from node.privacy._reply import FrameWriter, destination_layer_key, reply_link_key

log = logging.getLogger(__name__)

#: Serves one rebuilt request: receives the application request bytes, yields reply bytes as they are produced.
ReplyHandler = Callable[[bytes], AsyncIterator[bytes]]

#: Combine attempts per message, whatever its cloves: the first k to arrive, then (if that failed authentication)
#: the newest k once one more clove is in. No subset search: every clove came inside an onion layer only its
#: sender could build, so a bad clove means a broken or hostile client, which may lose its own request but must not
#: make one message cost the node more than two rebuilds.
MAX_COMBINE_ATTEMPTS = 2
#: Most reply bytes batched before a batch goes out early; a batch is cut into ``MAX_REPLY_DATA``-byte chunks.
_MAX_BATCH = 16_384


@dataclass(slots=True)
class _Message:
    created: float
    source: str
    k: int
    cloves: dict[int, Clove] = field(default_factory=dict)
    """The cloves so far, until the message is assembled; then emptied (see ``digests``)."""
    digests: dict[int, bytes] = field(default_factory=dict)
    """Once assembled: a digest of each clove that arrived, by index. The payloads are dropped then: a message lingers
    after its reply for late cloves, and anyone can build valid cloves (the keys are public), so keeping up to 16
    of 128 KiB each per message would let a stranger hold ``max_messages`` x 2 MiB of memory; a late clove only needs
    to be checked for consistency."""
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the message is assembled, or given up (``error`` then says why)."""
    error: RejectReason | None = None
    backlog: list[bytes] = field(default_factory=list)
    subscribers: set[asyncio.Queue[bytes | None]] = field(default_factory=set)
    finished_at: float | None = None
    task: asyncio.Task[None] | None = None
    attempts: int = 0
    paths: int = 0
    """Requests (paths) of this message being handled now: waiting for assembly or streaming its reply."""
    reply_key: bytes = field(default=b"", repr=False)
    """The rebuilt request's reply key (keys the chunks and each path's layer, §6); empty until assembled."""


def _digest(clove: Clove) -> bytes:
    """What an assembled message remembers of a clove: enough to tell a different clove with the same index."""
    return hashlib.blake2b(clove.to_bytes(), digest_size=16).digest()


def _close(queue: asyncio.Queue[bytes | None]) -> None:
    """Tell a path's stream to end; a full queue belongs to a stalled path, which its idle timeout ends."""
    with contextlib.suppress(asyncio.QueueFull):
        queue.put_nowait(None)


class CloveReceiver:
    """Assembles messages from cloves and fans each reply out to the paths that carried them.

    State is bounded and expires: at most ``max_messages`` messages, of which each source (previous hop's address)
    may have started at most ``max_incomplete_per_source`` that are still short of k cloves; a message short of k is
    forgotten ``assembly_timeout_s`` after its first clove, a finished one ``message_linger_s`` after its end; each
    message costs at most :data:`MAX_COMBINE_ATTEMPTS` rebuilds; a reply whose every path has gone is cancelled (the
    handler's generator is closed, which makes the completion handler abort the engine's request). :meth:`sweep`
    runs periodically from the application's cleanup context.
    """

    def __init__(self, handler: ReplyHandler, config: OverlayConfig, metrics: OverlayMetrics) -> None:
        self._handler = handler
        self._config = config
        self._metrics = metrics
        # Insertion order is creation order; ``_finished`` holds finished messages in the order they finished;
        # ``_incomplete`` holds, per source, its messages still short of k cloves, oldest first. All three let
        # sweeping and eviction stop at the first entry still in time instead of scanning every message.
        self._messages: dict[bytes, _Message] = {}
        self._finished: OrderedDict[bytes, float] = OrderedDict()
        self._incomplete: dict[str, OrderedDict[bytes, None]] = {}
        self.combine_attempts = 0
        """Combine attempts so far (all messages): what a crafted clove could otherwise multiply."""
        self.replies_cancelled = 0
        """Replies cancelled because every path of their request had gone."""
        self.evicted = 0
        """Messages short of k cloves dropped to make room (source over its quota, or the table full)."""

    def __len__(self) -> int:
        return len(self._messages)

    def incomplete(self, source: str) -> int:
        """Messages short of k cloves that ``source`` started and that are still kept."""
        return len(self._incomplete.get(source, ()))

    def sweep(self, now: float | None = None) -> None:
        """Forget messages that never assembled or whose reply is done and past the linger time.

        Cost is the number of messages dropped plus those older than the assembly timeout still being served: it
        walks both orders only up to the first message that is still in time.
        """
        current = time.monotonic() if now is None else now
        while self._finished:
            message_id, finished_at = next(iter(self._finished.items()))
            if current - finished_at <= self._config.message_linger_s:
                break
            self._drop(message_id)
        stale = []
        for message_id, msg in self._messages.items():
            if current - msg.created <= self._config.assembly_timeout_s:
                break
            if not msg.ready.is_set():
                stale.append(message_id)
        for message_id in stale:
            self._drop(message_id, RejectReason.UPSTREAM_TIMEOUT)

    def _settle(self, message_id: bytes, msg: _Message) -> None:
        """The message is no longer short of k cloves (assembled, given up or dropped): off its source's list."""
        by_source = self._incomplete.get(msg.source)
        if by_source is not None:
            by_source.pop(message_id, None)
            if not by_source:
                del self._incomplete[msg.source]

    def _drop(self, message_id: bytes, reason: RejectReason = RejectReason.UPSTREAM_TIMEOUT) -> None:
        self._finished.pop(message_id, None)
        msg = self._messages.pop(message_id, None)
        if msg is None:
            return
        self._settle(message_id, msg)
        if not msg.ready.is_set():  # wake the paths still waiting for the other cloves: they are answered ``reason``
            msg.error = reason
            msg.ready.set()
        if msg.task is not None and not msg.task.done():
            msg.task.cancel()
        for queue in msg.subscribers:
            _close(queue)

    async def close(self) -> None:
        """Cancel every reply in progress and wait for the tasks to end."""
        tasks = [m.task for m in self._messages.values() if m.task is not None]
        for message_id in list(self._messages):
            self._drop(message_id, RejectReason.OVERLOADED)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _evict_incomplete(self, source: str) -> bool:
        """Drop the oldest message short of k cloves of ``source``; False if it has none."""
        by_source = self._incomplete.get(source)
        if not by_source:
            return False
        self.evicted += 1
        self._drop(next(iter(by_source)), RejectReason.OVERLOADED)
        return True

    def _message_for(self, clove: Clove, source: str) -> _Message:
        msg = self._messages.get(clove.message_id)
        if msg is not None:
            return msg
        # A source over its quota of unfinished messages makes room from its own: it cannot push others out.
        if self.incomplete(source) >= self._config.max_incomplete_per_source:
            self._evict_incomplete(source)
        if len(self._messages) >= self._config.max_messages:
            self.sweep()
        if len(self._messages) >= self._config.max_messages:
            if self._finished:
                # Lingering is a courtesy to late cloves; make room by forgetting the longest-finished message.
                self._drop(next(iter(self._finished)))
            elif self._incomplete:
                # Else the oldest unfinished message of the source holding the most: an honest message needs its
                # k cloves for milliseconds, so a flood must outpace that to push one out.
                heaviest = max(self._incomplete, key=lambda s: len(self._incomplete[s]))
                self._evict_incomplete(heaviest)
            else:
                raise MalformedPacket(RejectReason.OVERLOADED, "too many messages being served")
        msg = _Message(created=time.monotonic(), source=source, k=clove.k)
        self._messages[clove.message_id] = msg
        self._incomplete.setdefault(source, OrderedDict())[clove.message_id] = None
        return msg

    def _try_assemble(self, message_id: bytes, msg: _Message) -> Envelope | None:
        """One combine attempt if this clove is the k-th or a later one and attempts remain (see
        :data:`MAX_COMBINE_ATTEMPTS`); gives the message up when the last allowed attempt fails."""
        if len(msg.cloves) < msg.k or msg.attempts >= MAX_COMBINE_ATTEMPTS:
            return None
        msg.attempts += 1
        self.combine_attempts += 1
        newest = list(msg.cloves.values())[-msg.k :]  # dicts keep arrival order
        try:
            return Envelope.from_bytes(combine(newest))
        except PrivacyError as exc:
            log.info("combination failed: %s", type(exc).__name__)
        if msg.attempts >= MAX_COMBINE_ATTEMPTS or len(msg.cloves) >= newest[0].n:
            # No attempt left (or no clove left to come): answer the waiting paths now, keep the id a while so that
            # late cloves are refused at once.
            self._settle(message_id, msg)
            msg.error = RejectReason.BAD_MAC
            msg.finished_at = time.monotonic()
            self._finished[message_id] = msg.finished_at
            msg.ready.set()
        return None

    def _publish(self, msg: _Message, frame: bytes) -> None:
        msg.backlog.append(frame)
        for queue in list(msg.subscribers):
            queue.put_nowait(frame)

    async def _serve(self, message_id: bytes, msg: _Message, envelope: Envelope) -> None:
        seq = 0
        key = envelope.reply_key
        limit = self._config.max_backlog_frames - 1
        try:
            replies = coalesce(self._handler(envelope.body), self._config.reply_flush_interval_s, _MAX_BATCH)
            async with asyncio.timeout(self._config.reply_timeout_s), contextlib.aclosing(replies):
                async for data in replies:
                    for start in range(0, max(len(data), 1), MAX_REPLY_DATA):
                        if seq >= limit:
                            raise OverflowError("reply longer than max_backlog_frames chunks")
                        self._publish(msg, seal_reply(key, seq, data[start : start + MAX_REPLY_DATA]))
                        seq += 1
            self._publish(msg, seal_reply(key, seq, b"", final=True))
            self._metrics.messages_served += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the handler is foreign code: report its failure to the client, never its details
            log.warning("reply handler failed: %s", type(exc).__name__)
            self._publish(msg, seal_reply(key, seq, b"destination failed", final=True, error=True))
        finally:
            msg.finished_at = time.monotonic()
            if self._messages.get(message_id) is msg:  # not dropped meanwhile
                self._finished[message_id] = msg.finished_at
            for queue in list(msg.subscribers):
                _close(queue)

    def _path_gone(self, msg: _Message) -> None:
        """One path of ``msg`` ended; when it was the last and the reply is still being made, cancel it: nobody
        can receive it any more, and the engine should stop spending time on it."""
        msg.paths -= 1
        if msg.paths == 0 and msg.task is not None and not msg.task.done():
            self.replies_cancelled += 1
            log.info("every reply path is gone: cancelling the reply")
            msg.task.cancel()

    async def deliver(self, request: web.Request, clove_bytes: bytes, k_reply: bytes) -> web.StreamResponse:
        """Accept one clove that arrived over one path, and stream the message's reply back over that path.

        ``k_reply`` is this hop's §5.3 reply key for the packet: it keys the path's link tags (§6.2).
        """
        clove = Clove.from_bytes(clove_bytes)
        source = request.remote or "unknown"
        existing_msg = self._messages.get(clove.message_id)
        if existing_msg is not None and existing_msg.error is not None:
            raise MalformedPacket(existing_msg.error, "this message was given up")
        msg = self._message_for(clove, source)
        if msg.k != clove.k:
            raise MalformedPacket(RejectReason.INCONSISTENT, "k differs from earlier cloves")
        if msg.reply_key:  # assembled: only digests are kept
            digest = _digest(clove)
            if msg.digests.setdefault(clove.index, digest) != digest:
                raise MalformedPacket(RejectReason.INCONSISTENT, "a different clove with this index already arrived")
        else:
            existing = msg.cloves.get(clove.index)
            if existing is not None and existing != clove:
                raise MalformedPacket(RejectReason.INCONSISTENT, "a different clove with this index already arrived")
            msg.cloves[clove.index] = clove
        self._metrics.delivered += 1
        msg.paths += 1
        try:
            if not msg.ready.is_set():
                envelope = self._try_assemble(clove.message_id, msg)
                if envelope is not None:
                    self._settle(clove.message_id, msg)
                    msg.digests = {i: _digest(c) for i, c in msg.cloves.items()}
                    msg.cloves.clear()
                    msg.reply_key = envelope.reply_key
                    msg.ready.set()
                    msg.task = asyncio.get_running_loop().create_task(self._serve(clove.message_id, msg, envelope))
            remaining = msg.created + self._config.assembly_timeout_s - time.monotonic()
            try:
                async with asyncio.timeout(max(remaining, 0.0)):
                    await msg.ready.wait()
            except TimeoutError as exc:
                raise MalformedPacket(
                    RejectReason.UPSTREAM_TIMEOUT, "the message's other cloves did not arrive"
                ) from exc
            if msg.error is not None:
                raise MalformedPacket(msg.error, "the message could not be assembled")
            return await self._stream(request, msg, clove.index, k_reply)
        finally:
            self._path_gone(msg)

    async def _stream(
        self, request: web.Request, msg: _Message, clove_index: int, k_reply: bytes
    ) -> web.StreamResponse:
        # Subscribe and copy the backlog with no await in between, so that no frame is missed or duplicated.
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=self._config.max_backlog_frames + 2)
        for frame in msg.backlog:
            queue.put_nowait(frame)
        if msg.finished_at is not None:
            queue.put_nowait(None)
        msg.subscribers.add(queue)
        # §6.2: this path's own layer (from the request's reply key and this path's clove) and link key.
        writer = FrameWriter(
            layer_key=destination_layer_key(msg.reply_key, clove_index), link_key=reply_link_key(k_reply)
        )
        try:
            # §6.3: a random start per path, so that the paths of one request do not all answer 200 at one instant.
            jitter = self._config.reply_start_jitter_s
            if jitter > 0:
                await asyncio.sleep(secrets.randbelow(1_000_001) / 1_000_000 * jitter)
            response = web.StreamResponse(status=200, headers={"Content-Type": "application/octet-stream"})
            await response.prepare(request)
            sent = 0
            writing = False
            try:
                while True:
                    # The deadline covers the write too: a path that stops reading (its socket buffers full) would
                    # otherwise hold this stream, and an in-flight slot, for ever.
                    async with asyncio.timeout(self._config.idle_timeout_s):
                        item = await queue.get()
                        if item is None:
                            break
                        writing = True
                        await response.write(writer.seal(item))
                        writing = False
                    sent += 1
            except (TimeoutError, ConnectionError) as exc:
                self._metrics.streams_aborted += 1
                log.info("reply stream to a path ended after %d frames: %s", sent, type(exc).__name__)
                if writing and request.transport is not None:
                    request.transport.abort()  # ending the stream politely would wait on the same full buffer
                return response
            self._metrics.streams_completed += 1
            # The path may already be gone (the client got FINAL on another path and moved on): not an error.
            with contextlib.suppress(ConnectionError):
                await response.write_eof()
            return response
        finally:
            msg.subscribers.discard(queue)
