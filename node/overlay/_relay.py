"""The relay role: peel one layer, drop replays, forward to the next hop and pass its reply stream back with this
hop's reply layer added (``docs/protocol.md`` §5.4, §6.2)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from node.overlay._config import OverlayConfig
from node.overlay._metrics import OverlayMetrics
from node.overlay._peers import PeerDirectory
from node.privacy import MalformedPacket, PeeledForward, RejectReason, ReplayCache
from node.privacy._constants import FRAME_LEN_BYTES
from node.privacy._reply import FrameReader, FrameWriter, check_frame_len

log = logging.getLogger(__name__)

ONION_PATH = "/overlay/v1/onion"
#: What ends a reply stream that has already started (the previous hop then sees a truncated path).
_STREAM_ERRORS = (MalformedPacket, TimeoutError, aiohttp.ClientError, asyncio.IncompleteReadError, ConnectionError)


@dataclass(slots=True)
class RelayState:
    """What a relay keeps between requests: the replay cache and whether it is draining."""

    replay: ReplayCache
    draining: bool = False
    inflight: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


async def forward(
    request: web.Request,
    peeled: PeeledForward,
    session: aiohttp.ClientSession,
    config: OverlayConfig,
    metrics: OverlayMetrics,
    peers: PeerDirectory,
) -> web.StreamResponse:
    """Send the peeled packet to the next hop and relay its reply frames back, adding this hop's layer.

    The next hop is a registry id: it is resolved in this node's own view of the registry, and an id that is not a
    routable node there is refused (``UNKNOWN_NEXT_HOP``) before any connection is opened, so a packet can never make
    a relay dial an address of the sender's choosing. Redirects are never followed, for the same reason.
    Before the reply starts, failures are HTTP errors (502/504); once it has started they end the stream, which the
    client sees as a failed path.
    """
    peer = await peers.resolve(peeled.next_node)
    if peer is None:
        raise MalformedPacket(RejectReason.UNKNOWN_NEXT_HOP, "next hop is not a routable registered node")
    url = peer.endpoint + ONION_PATH
    timeout = aiohttp.ClientTimeout(
        total=None, connect=config.connect_timeout_s, sock_read=config.idle_timeout_s, sock_connect=None
    )
    try:
        async with asyncio.timeout(config.upstream_headers_timeout_s):
            upstream = await session.post(
                url,
                data=peeled.packet,
                headers={"Content-Type": "application/octet-stream"},
                timeout=timeout,
                allow_redirects=False,
            )
    except TimeoutError as exc:
        raise MalformedPacket(RejectReason.UPSTREAM_TIMEOUT) from exc
    except aiohttp.ClientError as exc:
        raise MalformedPacket(RejectReason.UPSTREAM_FAILED, type(exc).__name__) from exc
    metrics.forwarded += 1
    async with upstream:
        if upstream.status != 200:
            raise MalformedPacket(RejectReason.UPSTREAM_FAILED, f"next hop answered {upstream.status}")
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/octet-stream"})
        try:
            await response.prepare(request)
        except ConnectionError:
            # The previous hop hung up while this hop waited for the next one (its client gave up on the path):
            # nothing to relay to, and leaving the exchange closes the next hop's stream too.
            metrics.streams_aborted += 1
            return response
        index = 0
        # §6.2: check each frame's link tag under the key the sender put in this hop's slot before passing anything
        # on, then add this hop's layer and tag it for the previous hop.
        reader = FrameReader(peeled.next_link_key)
        writer = FrameWriter.for_hop(peeled.keys.reply)
        writing = False
        try:
            async with asyncio.timeout(config.circuit_lifetime_s):
                while True:
                    # Each whole frame within idle_timeout_s of the previous one, read and written: a per-read
                    # timeout (sock_read) alone would let a next hop that trickles a byte at a time hold this slot
                    # for the lifetime, and an untimed write a previous hop that stops reading.
                    async with asyncio.timeout(config.idle_timeout_s):
                        try:
                            prefix = await upstream.content.readexactly(FRAME_LEN_BYTES)
                        except asyncio.IncompleteReadError as exc:
                            if exc.partial:
                                raise MalformedPacket(RejectReason.BAD_LENGTH, "truncated frame") from exc
                            break
                        length = check_frame_len(prefix)
                        body = await upstream.content.readexactly(length)
                        writing = True
                        await response.write(writer.seal(reader.open(body)))
                        writing = False
                    index += 1
        except (
            MalformedPacket,
            TimeoutError,
            aiohttp.ClientError,
            asyncio.IncompleteReadError,
            ConnectionError,
        ) as exc:
            metrics.streams_aborted += 1
            log.info("reply stream aborted after %d frames: %s", index, type(exc).__name__)
            if writing and request.transport is not None:
                request.transport.abort()  # ending the stream politely would wait on the same full buffer
            return response
        metrics.streams_completed += 1
        # The previous hop may already have hung up (its client got FINAL on another path and moved on): not an error.
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
        return response
