"""The model-node side: collect cloves per message, rebuild the request from any k, run a handler, and stream its
reply back on every path that delivered a clove (``docs/protocol.md`` §3.3, §4, §6.1).

Reusable: the inference engine plugs in as ``handler: async (request_bytes) -> AsyncIterator[bytes]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
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

#: Most k-subsets tried when a combination fails authentication (a tampered clove among those received).
_MAX_COMBINE_TRIES = 64
#: Most reply bytes batched before a batch goes out early; a batch is cut into ``MAX_REPLY_DATA``-byte chunks.
_MAX_BATCH = 16_384


@dataclass(slots=True)
class _Message:
    created: float
    cloves: dict[int, Clove] = field(default_factory=dict)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    backlog: list[bytes] = field(default_factory=list)
    subscribers: set[asyncio.Queue[bytes | None]] = field(default_factory=set)
    finished_at: float | None = None
    task: asyncio.Task[None] | None = None
    tried: set[tuple[int, ...]] = field(default_factory=set)
    reply_key: bytes = field(default=b"", repr=False)
    """The rebuilt request's reply key (keys the chunks and each path's layer, §6); empty until assembled."""


def _close(queue: asyncio.Queue[bytes | None]) -> None:
    """Tell a path's stream to end; a full queue belongs to a stalled path, which its idle timeout ends."""
    with contextlib.suppress(asyncio.QueueFull):
        queue.put_nowait(None)


class CloveReceiver:
    """Assembles messages from cloves and fans each reply out to the paths that carried them.

    State is bounded (``max_messages``, ``max_backlog_frames``) and expires (``assembly_timeout_s``,
    ``message_linger_s``); :meth:`sweep` runs periodically from the application's cleanup context.
    """

    def __init__(self, handler: ReplyHandler, config: OverlayConfig, metrics: OverlayMetrics) -> None:
        self._handler = handler
        self._config = config
        self._metrics = metrics
        # Insertion order is creation order; ``_finished`` holds finished messages in the order they finished. Both
        # let sweeping and eviction stop at the first entry still in time instead of scanning every message.
        self._messages: dict[bytes, _Message] = {}
        self._finished: OrderedDict[bytes, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._messages)

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
            self._drop(message_id)

    def _drop(self, message_id: bytes) -> None:
        self._finished.pop(message_id, None)
        msg = self._messages.pop(message_id, None)
        if msg is None:
            return
        if msg.task is not None and not msg.task.done():
            msg.task.cancel()
        for queue in msg.subscribers:
            _close(queue)

    async def close(self) -> None:
        """Cancel every reply in progress and wait for the tasks to end."""
        tasks = [m.task for m in self._messages.values() if m.task is not None]
        for message_id in list(self._messages):
            self._drop(message_id)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _message_for(self, clove: Clove) -> _Message:
        msg = self._messages.get(clove.message_id)
        if msg is None:
            if len(self._messages) >= self._config.max_messages:
                self.sweep()
            if len(self._messages) >= self._config.max_messages:
                # Lingering is a courtesy to late cloves; make room by forgetting the longest-finished message.
                if not self._finished:
                    raise MalformedPacket(RejectReason.OVERLOADED, "too many messages in flight")
                self._drop(next(iter(self._finished)))
            msg = _Message(created=time.monotonic())
            self._messages[clove.message_id] = msg
        return msg

    def _try_assemble(self, msg: _Message, newest: int) -> Envelope | None:
        k = next(iter(msg.cloves.values())).k
        if len(msg.cloves) < k:
            return None
        others = [i for i in msg.cloves if i != newest]
        tries = 0
        for rest in itertools.combinations(others, k - 1):
            subset = tuple(sorted((*rest, newest)))
            if subset in msg.tried:
                continue
            msg.tried.add(subset)
            tries += 1
            try:
                return Envelope.from_bytes(combine(msg.cloves[i] for i in subset))
            except PrivacyError as exc:
                log.info("combination failed: %s", type(exc).__name__)
            if tries >= _MAX_COMBINE_TRIES:
                break
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

    async def deliver(self, request: web.Request, clove_bytes: bytes, k_reply: bytes) -> web.StreamResponse:
        """Accept one clove that arrived over one path, and stream the message's reply back over that path.

        ``k_reply`` is this hop's §5.3 reply key for the packet: it keys the path's link tags (§6.2).
        """
        clove = Clove.from_bytes(clove_bytes)
        msg = self._message_for(clove)
        existing = msg.cloves.get(clove.index)
        if existing is not None and existing != clove:
            raise MalformedPacket(RejectReason.INCONSISTENT, "a different clove with this index already arrived")
        if msg.cloves and next(iter(msg.cloves.values())).k != clove.k:
            raise MalformedPacket(RejectReason.INCONSISTENT, "k differs from earlier cloves")
        msg.cloves[clove.index] = clove
        self._metrics.delivered += 1
        if not msg.ready.is_set():
            envelope = self._try_assemble(msg, clove.index)
            if envelope is not None:
                msg.reply_key = envelope.reply_key
                msg.ready.set()
                msg.task = asyncio.get_running_loop().create_task(self._serve(clove.message_id, msg, envelope))
        try:
            async with asyncio.timeout(self._config.assembly_timeout_s):
                await msg.ready.wait()
        except TimeoutError as exc:
            raise MalformedPacket(RejectReason.UPSTREAM_TIMEOUT, "the message's other cloves did not arrive") from exc
        # Subscribe and copy the backlog with no await in between, so that no frame is missed or duplicated.
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=self._config.max_backlog_frames + 2)
        for frame in msg.backlog:
            queue.put_nowait(frame)
        if msg.finished_at is not None:
            queue.put_nowait(None)
        msg.subscribers.add(queue)
        # §6.2: this path's own layer (from the request's reply key and this path's clove) and link key.
        writer = FrameWriter(
            layer_key=destination_layer_key(msg.reply_key, clove.index), link_key=reply_link_key(k_reply)
        )
        try:
            # §6.3: a random start per path, so that the paths of one request do not all answer 200 at one instant.
            jitter = self._config.reply_start_jitter_s
            if jitter > 0:
                await asyncio.sleep(secrets.randbelow(1_000_001) / 1_000_000 * jitter)
            response = web.StreamResponse(status=200, headers={"Content-Type": "application/octet-stream"})
            await response.prepare(request)
            sent = 0
            try:
                while True:
                    async with asyncio.timeout(self._config.idle_timeout_s):
                        item = await queue.get()
                    if item is None:
                        break
                    await response.write(writer.seal(item))
                    sent += 1
            except (TimeoutError, ConnectionError) as exc:
                self._metrics.streams_aborted += 1
                log.info("reply stream to a path ended after %d frames: %s", sent, type(exc).__name__)
                return response
            self._metrics.streams_completed += 1
            # The path may already be gone (the client got FINAL on another path and moved on): not an error.
            with contextlib.suppress(ConnectionError):
                await response.write_eof()
            return response
        finally:
            msg.subscribers.discard(queue)
