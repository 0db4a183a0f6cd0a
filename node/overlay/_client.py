"""The client side of the privacy path: seal a request, split it into cloves, send each over its own onion path,
and reassemble the destination's reply stream: in order, de-duplicated, surviving failed paths."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import secrets
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

import aiohttp

from node.overlay._errors import DestinationFailed, ReplyIncomplete
from node.overlay._peers import Peer
from node.overlay._relay import ONION_PATH
from node.privacy import (
    BuiltOnion,
    Envelope,
    InvalidPrivacyParam,
    MalformedPacket,
    RejectReason,
    RelayDescriptor,
    ReplyChunk,
    build_onion,
    open_reply,
    split,
)
from node.privacy._constants import EXPIRY_GRANULARITY, FRAME_LEN_BYTES, MAX_TTL
from node.privacy._reply import (
    FrameReader,
    check_frame_len,
    destination_layer_key,
    reply_link_key,
    strip_reply_layers,
)
from node.privacy._sizeclass import size_class

log = logging.getLogger(__name__)

#: Error codes with which a hop says the failure is behind it (``docs/protocol.md`` §7).
_UPSTREAM_CODES = frozenset({RejectReason.UPSTREAM_FAILED.value, RejectReason.UPSTREAM_TIMEOUT.value})
#: Most bytes of an error answer a client reads (they are a few hundred).
_ERROR_BODY_MAX = 4096


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """How a client splits and sends requests."""

    n: int = 4
    """Cloves (and paths) per request, 2..16."""
    k: int = 3
    """Cloves that rebuild a request, 2..n."""
    ttl_s: int = 60
    """Longest packet lifetime in seconds (1..120): relays drop a packet afterwards."""
    ttl_jitter_s: int = 2 * EXPIRY_GRANULARITY
    """§6.3: each path's lifetime is drawn uniformly from ``ttl_s - ttl_jitter_s .. ttl_s`` seconds (0..ttl_s-1), so
    the paths of one request do not share one expiry."""
    size_classes: bool = True
    """§6.3: pad every clove's onion payload to the smallest request size class (1, 4, 16, 64, 128 KiB) that holds
    it, so the packets show a request's class, not its length. False: the smallest multiple of 256 bytes."""
    connect_timeout_s: float = 10.0
    """Seconds to connect to a first hop."""
    headers_timeout_s: float = 45.0
    """Seconds to wait for a first hop's response headers (covers assembly at the destination)."""
    idle_timeout_s: float = 60.0
    """Most seconds between two reply frames on a path before that path counts as failed."""
    reorder_window: int = 4096
    """Most out-of-order chunks buffered; later ones are dropped."""
    drain_grace_s: float = 5.0
    """After a complete reply, seconds the other paths may keep reading (and discarding) their copy of its end.

    Reading a stream to its end lets its connection return to the pool; cancelling it closes the connection, and
    every hop behind it closes its own, so the next request pays a TCP handshake per hop. 0 cancels at once.
    """
    evidence_window_s: float = 0.2
    """Once too many paths failed for the request to be rebuilt, keep listening for the other paths' failures this
    many seconds, or as long again as the failures took to show up if that is longer (a loaded machine): what each
    path's first hop said is how a retry finds the dead relay."""

    def __post_init__(self) -> None:
        if not (2 <= self.k <= self.n <= 16):
            raise InvalidPrivacyParam("n,k", (self.n, self.k), "2 <= k <= n <= 16")
        if not (1 <= self.ttl_s <= MAX_TTL):
            raise InvalidPrivacyParam("ttl_s", self.ttl_s, f"1..{MAX_TTL} seconds")
        if not (0 <= self.ttl_jitter_s < self.ttl_s):
            raise InvalidPrivacyParam("ttl_jitter_s", self.ttl_jitter_s, f"0..{self.ttl_s - 1} seconds")
        if not (0 <= self.drain_grace_s <= 60):
            raise InvalidPrivacyParam("drain_grace_s", self.drain_grace_s, "0..60 seconds")
        if not (0 <= self.evidence_window_s <= 10):
            raise InvalidPrivacyParam("evidence_window_s", self.evidence_window_s, "0..10 seconds")


@dataclass(frozen=True, slots=True)
class _PathEnded:
    """A path's reader finished. ``started``: its first hop answered 200, so its clove went all the way;
    ``first_hop_failed``: the failure is the first hop's own (no answer at all, or a refusal that is not about a hop
    behind it); otherwise the first hop is up and forwarding and something behind it failed."""

    index: int
    started: bool
    first_hop_failed: bool


class _Inbox:
    """Reply chunks from every path, plus one end marker per path.

    Chunks are bounded by ``capacity``; the end markers have reserved room, so a path that ends (or is cancelled)
    can always say so without waiting, and the reader never misses that every path is gone. Once the reader is done
    (:meth:`close`), chunks from paths still draining are dropped.
    """

    __slots__ = ("_closed", "_queue", "_slots")

    def __init__(self, paths: int, capacity: int) -> None:
        self._queue: asyncio.Queue[ReplyChunk | _PathEnded] = asyncio.Queue(maxsize=capacity + paths)
        self._slots = asyncio.Semaphore(capacity)
        self._closed = False

    async def put(self, chunk: ReplyChunk) -> None:
        if self._closed:
            return
        await self._slots.acquire()
        self._queue.put_nowait(chunk)

    def close(self) -> None:
        self._closed = True

    def end(self, marker: _PathEnded) -> None:
        self._queue.put_nowait(marker)

    async def get(self) -> ReplyChunk | _PathEnded:
        item = await self._queue.get()
        if isinstance(item, ReplyChunk):
            self._slots.release()
        return item


async def _read_path(
    session: aiohttp.ClientSession,
    index_of_path: int,
    first_endpoint: str,
    built: BuiltOnion,
    reply_key: bytes,
    settings: ClientSettings,
    out: _Inbox,
) -> None:
    """POST one packet and push every authenticated reply chunk into ``out``; push a marker when the path ends."""
    started = False
    first_hop_failed = True
    timeout = aiohttp.ClientTimeout(total=None, connect=settings.connect_timeout_s, sock_read=settings.idle_timeout_s)
    try:
        async with asyncio.timeout(settings.headers_timeout_s):
            response = await session.post(
                first_endpoint + ONION_PATH,
                data=built.packet,
                headers={"Content-Type": "application/octet-stream"},
                timeout=timeout,
                allow_redirects=False,  # a first hop must not send the client anywhere else
            )
        async with response:
            if response.status != 200:
                first_hop_failed = not await _blames_a_later_hop(response)
                log.info("path rejected with HTTP %d", response.status)
                return
            started = True
            first_hop_failed = False
            index = 0
            # §6.2: frames from the first hop carry its link tag, keyed by hop 0's k_reply (on a direct path hop 0 is
            # the destination). Path i carries clove i + 1 (split numbers cloves 1..n in order), which keys the
            # destination's layer on it.
            reader = FrameReader(reply_link_key(built.reply_keys[0]))
            layer_keys = (*built.relay_reply_keys, destination_layer_key(reply_key, index_of_path + 1))
            poisoned = False
            while True:
                async with asyncio.timeout(settings.idle_timeout_s):
                    try:
                        prefix = await response.content.readexactly(FRAME_LEN_BYTES)
                    except asyncio.IncompleteReadError:
                        return
                    body = await response.content.readexactly(check_frame_len(prefix))
                layered = reader.open(body)
                index += 1
                if poisoned:
                    continue
                try:
                    chunk = open_reply(reply_key, strip_reply_layers(layer_keys, index - 1, layered))
                except MalformedPacket as exc:
                    # Something upstream of the first hop changed the chunk. Read on exactly as from a healthy path
                    # (§6.2): reacting would show the first hop that its upstream accomplice's mark arrived.
                    log.info("path delivered a bad chunk (%s); reading it to its end", exc.reason.value)
                    poisoned = True
                    continue
                await out.put(chunk)
                if chunk.final:
                    # Read the end of the stream so that the connection goes back to the pool for the next request.
                    async with asyncio.timeout(settings.idle_timeout_s):
                        await response.content.read()
                    return
    except (aiohttp.ClientError, TimeoutError, asyncio.IncompleteReadError, MalformedPacket, ConnectionError) as exc:
        log.info("path failed: %s", type(exc).__name__)
    finally:
        out.end(_PathEnded(index_of_path, started, first_hop_failed))


async def _blames_a_later_hop(response: aiohttp.ClientResponse) -> bool:
    """Whether a first hop's error answer says a hop behind it failed (§7 ``upstream_*`` codes)."""
    try:
        async with asyncio.timeout(1.0):
            body = json.loads(await response.content.read(_ERROR_BODY_MAX))
        return isinstance(body, dict) and body.get("error", {}).get("code") in _UPSTREAM_CODES
    except (ValueError, AttributeError, TimeoutError, aiohttp.ClientError):
        return False


async def send_request(
    session: aiohttp.ClientSession,
    body: bytes,
    paths: Sequence[Sequence[RelayDescriptor]],
    destination: Peer,
    settings: ClientSettings | None = None,
) -> AsyncGenerator[bytes, None]:
    """Send ``body`` to ``destination`` over ``paths`` (one clove per path) and yield the reply as it streams back.

    Raises :class:`ReplyIncomplete` when every path failed before the final chunk, or at once when more than
    ``n - k`` paths failed before their first hop answered (the destination cannot have ``k`` cloves then, and the
    surviving paths would only wait for its assembly timeout); :class:`DestinationFailed` when the destination
    reported an error. Chunks arriving on several paths are yielded once, in sequence order.
    """
    settings = settings or ClientSettings()
    if len(paths) != settings.n:
        raise InvalidPrivacyParam("len(paths)", len(paths), f"n = {settings.n}")
    if len(body) > Envelope.max_body():
        raise InvalidPrivacyParam("len(body)", len(body), f"at most {Envelope.max_body()} bytes")
    reply_key = secrets.token_bytes(32)
    cloves = split(Envelope(reply_key=reply_key, body=body).to_bytes(), settings.n, settings.k)
    assert [c.index for c in cloves] == list(range(1, settings.n + 1))  # path i carries clove i + 1 (§6.2)
    # §6.3: one size class for the whole request (every clove has the same length) and a lifetime drawn per path.
    clove_len = len(cloves[0].to_bytes())
    payload_len = size_class(clove_len) if settings.size_classes else None
    onions = [
        build_onion(
            [*(r.hop() for r in path), destination.hop()],
            clove.to_bytes(),
            ttl=settings.ttl_s - secrets.randbelow(settings.ttl_jitter_s + 1),
            payload_len=payload_len,
        )
        for path, clove in zip(paths, cloves, strict=True)
    ]
    first_endpoints = [path[0].endpoint if path else destination.endpoint for path in paths]
    inbox = _Inbox(paths=len(onions), capacity=settings.n * 64)
    tasks = [
        asyncio.create_task(_read_path(session, i, first_endpoints[i], built, reply_key, settings, inbox))
        for i, built in enumerate(onions)
    ]
    live = len(tasks)
    failed_early: list[int] = []
    started: list[int] = []
    first_hop_failed: list[int] = []
    next_seq = 0
    pending: dict[int, ReplyChunk] = {}
    complete = False
    give_up_at: float | None = None
    loop = asyncio.get_running_loop()
    sent_at = loop.time()
    try:
        while True:
            # Every path task ends (and says so) within its own timeouts; once hopeless, wait only a short while.
            try:
                async with asyncio.timeout_at(give_up_at):
                    item = await inbox.get()
            except TimeoutError:
                item = None
            if item is None or isinstance(item, _PathEnded):
                if isinstance(item, _PathEnded):
                    live -= 1
                    (started if item.started else failed_early).append(item.index)
                    if item.first_hop_failed and not item.started:
                        first_hop_failed.append(item.index)
                # A 200 from a first hop means the destination rebuilt the request (it answers only then), so the
                # request is hopeless only while no path has started and too few are left to carry k cloves.
                hopeless = not started and len(failed_early) > settings.n - settings.k
                if not hopeless:
                    give_up_at = None  # a path answered 200 meanwhile: the request is being served after all
                elif give_up_at is None:
                    now = loop.time()
                    give_up_at = now + max(settings.evidence_window_s, now - sent_at)
                expired = give_up_at is not None and loop.time() >= give_up_at
                if live == 0 or (hopeless and expired):
                    raise ReplyIncomplete(
                        paths=len(tasks),
                        received=next_seq,
                        failed_early=tuple(failed_early),
                        started=tuple(started),
                        first_hop_failed=tuple(first_hop_failed),
                    )
                continue
            if item.seq < next_seq or item.seq in pending or item.seq >= next_seq + settings.reorder_window:
                continue
            pending[item.seq] = item
            while next_seq in pending:
                chunk = pending.pop(next_seq)
                next_seq += 1
                if chunk.error:
                    raise DestinationFailed("the destination could not serve the request")
                if chunk.data:
                    yield chunk.data
                if chunk.final:
                    complete = True
                    return
    finally:
        inbox.close()
        if complete and settings.drain_grace_s > 0:
            _drain_in_background(tasks, settings.drain_grace_s)
        else:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task


def _drain_in_background(tasks: list[asyncio.Task[None]], grace_s: float) -> None:
    """Let unfinished path readers finish on their own, each cancelled after ``grace_s`` at the latest.

    The timer handle holds the only strong reference to a still-running task (the event loop keeps weak ones); the
    task's done callback cancels the timer, which releases it.
    """
    loop = asyncio.get_running_loop()
    for task in tasks:
        if task.done():
            continue
        timer = loop.call_later(grace_s, task.cancel)
        task.add_done_callback(functools.partial(_cancel_timer, timer))


def _cancel_timer(timer: asyncio.TimerHandle, _task: asyncio.Task[None]) -> None:
    timer.cancel()
