"""Re-forwarding by an overloaded model node (``docs/protocol.md`` §10.5).

Why a model node forwards at all, when the client already chose it: the client chose on a heartbeat that may be a
second old, and a burst can fill one node's queue while a peer serving the same model sits idle. The node sees its
own queue now, so it can shed a request it has already accepted (and been paid for) instead of making the client
wait or fail. It does so once: the request it sends carries ``forwarded``, which no node re-forwards again, so a
request crosses at most one extra hop whatever anyone's heartbeat says.

The node acts as a user node of its peer: it sends the request as a private request of its own (onion paths, a fresh
reply key, its own voucher when the peer charges), reads the peer's deltas and hands them to its reply handler as if
its own engine had produced them, so they travel back on the client's reverse paths unchanged. A peer that fails
before its first delta costs the client only time: the node serves the request itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import ValidationError

from node._errors import PlanetServeError
from node.inference import Engine, GenerationChunk, GenerationRequest, InferenceError, InvalidParams
from node.overlay._client import ClientSettings
from node.overlay._completion import CompletionDelta, CompletionRequest, complete
from node.overlay._dialing import public_only_socket
from node.overlay._directory import Directory, ModelNode
from node.overlay._errors import ReplyIncomplete, SessionClosed
from node.overlay._heartbeat import (
    HEARTBEAT_PATH,
    MAX_HEARTBEAT_BYTES,
    Heartbeat,
    HeartbeatCheck,
    HeartbeatRejected,
    SignedHeartbeat,
)

log = logging.getLogger(__name__)

#: Outcomes counted in ``planetserve_reforwards_total`` (§10.5 "Counting"); a fixed set, so bounded labels.
OUTCOMES = ("served_by_peer", "peer_failed", "broken", "no_peer", "busy", "already_forwarded")
#: Seconds the node waits for its registry view when choosing a peer.
_DIRECTORY_TIMEOUT_S = 5.0

#: The node's view of the registry: relays for its paths and the model nodes that may be its peers.
DirectorySource = Callable[[], Awaitable[Directory]]


class ReforwardFailed(InferenceError):
    """The peer's reply broke after part of it was relayed to the client (§10.5 error line ``reforward_failed``)."""

    code = "reforward_failed"

    def __init__(self) -> None:
        super().__init__("the peer serving the re-forwarded request failed mid-reply")


class Payer(Protocol):
    """What pays a charging peer from the node's own wallet (``node.client.Wallet`` has this shape)."""

    async def pay(
        self, destination: ModelNode, request: CompletionRequest, prompt_tokens: int | None
    ) -> tuple[CompletionRequest, Any]:
        """``request`` with a voucher for ``destination``, and the payment to finish (None for a free peer)."""
        ...

    def admitted(self, payment: Any) -> None:
        """The peer answered the paid request (its voucher was accepted)."""
        ...

    def finish(self, payment: Any, used_tokens: int | None) -> None:
        """Close the payment's books: tokens of the last delta, 0 when the peer never had it, None when unknown."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class ReforwardConfig:
    """When and how a model node re-forwards (§10.5)."""

    operator: str
    """This node's own operator address: never a peer of itself."""
    queue_bound: int = 4
    """Re-forward when more than this many requests wait for admission in the engine (0..); a peer qualifies only
    if its heartbeat reports at most this many."""
    max_concurrent: int = 4
    """Most re-forwards in flight at once (1..64): what the node sends on others' behalf is bounded."""
    hops: int = 1
    """Relays per path of the re-forwarded request (1..5): the node's identity is public, so one relay is enough to
    keep an observer of the node from seeing its link to the peer, and each more one adds latency to a request that
    is being re-forwarded because it is already late."""
    max_candidates: int = 8
    """Peers whose heartbeat is fetched per decision at most (1..64, drawn at random): bounded work per request."""
    heartbeat_refresh_s: float = 0.5
    """Peers' heartbeats older than this are fetched again before choosing, seconds."""
    heartbeat_max_age_s: float = 5.0
    """A peer's heartbeat older than this does not count, seconds."""
    heartbeat_timeout_s: float = 1.0
    """Per heartbeat fetch, seconds."""
    max_peer_price_per_1k_tokens: int | None = None
    """With a payer: the highest peer price paid, wei per 1000 tokens (None: any, within the wallet's budget).
    Without a payer only free peers qualify, whatever this says."""
    settings: ClientSettings = field(
        default_factory=lambda: ClientSettings(connect_timeout_s=2.0, headers_timeout_s=15.0, drain_grace_s=1.0)
    )
    """How the re-forwarded request is split and sent (short connect and header timeouts: a dead peer should be
    found out quickly, so that the node serves the request itself without much delay)."""
    dial_private_addresses: bool = True
    """Whether peer heartbeats and re-forwarded requests may go to non-public addresses: as the node's own
    ``OverlayConfig.dial_private_addresses`` (the registered endpoints it dials are the same strangers' choice)."""

    def __post_init__(self) -> None:
        for name, low, high in (
            ("queue_bound", 0, 1 << 20),
            ("max_concurrent", 1, 64),
            ("hops", 1, 5),
            ("max_candidates", 1, 64),
        ):
            value = getattr(self, name)
            if not low <= value <= high:
                raise InvalidParams(param=name, value=value, reason=f"{low}..{high}")
        for name in ("heartbeat_refresh_s", "heartbeat_max_age_s", "heartbeat_timeout_s"):
            if getattr(self, name) < 0 or (name != "heartbeat_refresh_s" and getattr(self, name) == 0):
                raise InvalidParams(param=name, value=getattr(self, name), reason="positive seconds")


@dataclass(slots=True)
class _PeerBeat:
    check: HeartbeatCheck
    latest: Heartbeat | None = None


class Reforwarder:
    """One model node's re-forwarding: the decision, the peer choice, the send and the relay of the reply.

    ``directory`` is the node's own registry view (relays and model nodes); ``payer`` pays charging peers (without
    one, only free peers qualify); ``tokenize`` counts prompt tokens for a voucher (the engine's own tokenizer).
    ``outcomes`` counts decisions by outcome; ``peak_in_flight`` is the most re-forwards that were in flight at once.
    """

    def __init__(
        self,
        config: ReforwardConfig,
        directory: DirectorySource,
        *,
        payer: Payer | None = None,
        tokenize: Callable[[str], Sequence[int]] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self._directory = directory
        self._payer = payer
        self._tokenize = tokenize
        self._rng = rng or random.Random()
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._beats: dict[str, _PeerBeat] = {}
        self._fetched_at: dict[str, float] = {}
        self.in_flight = 0
        self.peak_in_flight = 0
        self.outcomes: Counter[str] = Counter()

    def generate(
        self, request: CompletionRequest, generation: GenerationRequest, engine: Engine
    ) -> AsyncGenerator[GenerationChunk, None]:
        """The chunks answering ``request``: from a peer when §10.5 says to re-forward, else (or when the peer fails
        before its first delta) from ``engine``. Raises :class:`ReforwardFailed` if the peer fails mid-reply."""
        return self._generate(request, generation, engine)

    def _over_bound(self, request: CompletionRequest, engine: Engine) -> str | None:
        """None to serve locally without counting; else ``"reforward"`` or the outcome that stops it."""
        if engine.stats().queued_requests <= self.config.queue_bound:
            return None
        if request.forwarded:
            return "already_forwarded"
        if self.in_flight >= self.config.max_concurrent:
            return "busy"
        return "reforward"

    async def _generate(
        self, request: CompletionRequest, generation: GenerationRequest, engine: Engine
    ) -> AsyncGenerator[GenerationChunk, None]:
        decision = self._over_bound(request, engine)
        if decision == "reforward":
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            begun = time.monotonic()
            relayed = False
            outcome = "no_peer"
            try:
                peer, directory = await self._choose(request.model)
                if peer is not None:
                    outcome = "served_by_peer"  # also when the client leaves mid-reply: the peer served until then
                    try:
                        # Closed with this generator (the client left mid-reply): the peer's reply and its payment
                        # end now, not whenever the garbage collector finalizes the inner generator.
                        async with contextlib.aclosing(self._send(request, peer, directory)) as deltas:
                            async for delta in deltas:
                                relayed = True
                                yield _chunk(delta, generation.request_id)
                        return
                    except (PlanetServeError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                        outcome = "broken" if relayed else "peer_failed"
                        log.debug("re-forward failed: %s", type(exc).__name__)
                        if relayed:
                            raise ReforwardFailed() from exc
            finally:
                self.in_flight -= 1
                self.outcomes[outcome] += 1
                # One line per re-forward: outcome and timing, never the prompt, the reply or the peer's address.
                log.info("re-forward: %s after %.0f ms", outcome, (time.monotonic() - begun) * 1000)
        elif decision is not None:
            self.outcomes[decision] += 1
        async with contextlib.aclosing(engine.generate(generation)) as local:
            async for chunk in local:
                yield chunk

    async def _send(
        self, request: CompletionRequest, peer: ModelNode, directory: Directory
    ) -> AsyncGenerator[CompletionDelta, None]:
        """Send ``request`` to ``peer`` as this node's own private request and yield the peer's deltas."""
        settings = self.config.settings
        route = directory.route(request.model, n=settings.n, hops=self.config.hops, destination=peer)
        outgoing = request.model_copy(update={"forwarded": True, "voucher": None})
        payment: Any = None
        if peer.price_per_1k_tokens > 0:
            assert self._payer is not None  # _choose admits a charging peer only with a payer
            tokens = len(await asyncio.to_thread(self._tokenize, request.prompt)) if self._tokenize else None
            outgoing, payment = await self._payer.pay(peer, outgoing, tokens)
        used: int | None = None  # None: unknown, the peer may have charged its whole reservation
        seen: CompletionDelta | None = None
        try:
            async for delta in complete(self._client_session(), outgoing, route.paths, peer.peer(), settings):
                if seen is None and payment is not None and self._payer is not None:
                    self._payer.admitted(payment)
                seen = delta
                if delta.finish_reason is not None:
                    used = delta.prompt_tokens + delta.completion_tokens
                yield delta
        except ReplyIncomplete as failure:
            if not (failure.received or failure.started):
                used = 0  # no path answered: the peer never rebuilt the request, nor saw the voucher
            raise
        except PlanetServeError:
            # An error line: the peer charged the last delta it sent (nothing when it refused before serving).
            used = seen.prompt_tokens + seen.completion_tokens if seen is not None else 0
            raise
        finally:
            if payment is not None and self._payer is not None:
                self._payer.finish(payment, used)

    async def _choose(self, model_id: str) -> tuple[ModelNode | None, Directory]:
        """The least-loaded qualifying peer (§10.5 "To whom"), or None (also once closed: the node is stopping)."""
        if self._closed:
            return None, Directory(relays=(), model_nodes=())
        try:
            async with asyncio.timeout(_DIRECTORY_TIMEOUT_S):
                directory = await self._directory()
        except (PlanetServeError, OSError, TimeoutError) as exc:
            log.info("re-forward: no registry view (%s)", type(exc).__name__)
            return None, Directory(relays=(), model_nodes=())
        me = self.config.operator.lower()
        limit = self.config.max_peer_price_per_1k_tokens
        peers = [
            m
            for m in directory.serving(model_id)
            if m.operator.lower() != me
            and (
                m.price_per_1k_tokens == 0
                or (self._payer is not None and (limit is None or m.price_per_1k_tokens <= limit))
            )
        ]
        if len(peers) > self.config.max_candidates:
            peers = self._rng.sample(peers, self.config.max_candidates)
        await asyncio.gather(*(self._refresh(m) for m in peers))
        now = time.time()
        ranked: list[tuple[int, float, ModelNode]] = []
        for m in peers:
            beat = self._beats[m.operator].latest
            if beat is None or now - beat.issued_at_ms / 1000 > self.config.heartbeat_max_age_s:
                continue
            if beat.queued_requests > self.config.queue_bound:
                continue
            ranked.append((beat.queued_tokens, self._rng.random(), m))
        if not ranked:
            return None, directory
        return min(ranked, key=lambda r: (r[0], r[1]))[2], directory

    async def _refresh(self, peer: ModelNode) -> None:
        """Fetch and verify ``peer``'s heartbeat unless the last fetch is recent (bounded in size and time)."""
        entry = self._beats.get(peer.operator)
        if entry is None or entry.check.model_id != peer.model_id:
            entry = _PeerBeat(
                HeartbeatCheck(
                    operator=peer.operator, model_id=peer.model_id, max_age_s=self.config.heartbeat_max_age_s
                )
            )
            self._beats[peer.operator] = entry
        now = time.monotonic()
        if now - self._fetched_at.get(peer.operator, -float("inf")) < self.config.heartbeat_refresh_s:
            return
        self._fetched_at[peer.operator] = now
        try:
            async with (
                asyncio.timeout(self.config.heartbeat_timeout_s),
                self._client_session().get(peer.endpoint + HEARTBEAT_PATH, allow_redirects=False) as response,
            ):
                if response.status != 200:
                    raise OSError(f"heartbeat answered {response.status}")
                # ``read(n)`` returns what has arrived, up to n: a body in several segments is read to its end.
                raw = b""
                while len(raw) <= MAX_HEARTBEAT_BYTES and (part := await response.content.read(MAX_HEARTBEAT_BYTES)):
                    raw += part
            if len(raw) > MAX_HEARTBEAT_BYTES:
                raise HeartbeatRejected("too large")
            signed = SignedHeartbeat.model_validate_json(raw)
            if entry.latest is not None and signed.heartbeat == entry.latest:
                return  # not re-issued since (a node signs at most every interval): still the current one
            entry.latest = entry.check.accept(signed)
        except (HeartbeatRejected, ValidationError, aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            entry.latest = None  # a peer that does not answer, or answers badly, does not qualify
            log.debug("re-forward: a peer's heartbeat was not usable (%s)", type(exc).__name__)

    def _client_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise SessionClosed("re-forwarder")
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=4 * self.config.max_concurrent + self.config.max_candidates,
                    socket_factory=None if self.config.dial_private_addresses else public_only_socket,
                ),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.config.settings.connect_timeout_s),
                auto_decompress=False,
            )
        return self._session

    async def close(self) -> None:
        """Close the node's client connections (its app's cleanup does); a request still being handled then is
        served locally (no peer is chosen once closed)."""
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    def cleanup_ctx(self) -> Callable[[Any], AsyncIterator[None]]:
        """An aiohttp cleanup context that closes the session when the node stops."""

        async def ctx(_app: Any) -> AsyncIterator[None]:
            yield
            await self.close()

        return ctx


def _chunk(delta: CompletionDelta, request_id: str) -> GenerationChunk:
    """A peer's delta as the handler's chunk: the same fields and values, so the client reads it unchanged."""
    return GenerationChunk(
        request_id=request_id,
        token_ids=delta.token_ids,
        logprobs=delta.logprobs,
        text=delta.text,
        finish_reason=delta.finish_reason,
        prompt_tokens=delta.prompt_tokens,
        completion_tokens=delta.completion_tokens,
        cached_tokens=delta.cached_tokens,
    )


class ReforwardCollector(Collector):
    """``planetserve_reforwards_total{outcome}`` read from a :class:`Reforwarder` at scrape time."""

    def __init__(self, reforwarder: Reforwarder) -> None:
        self._reforwarder = reforwarder

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "planetserve_reforwards",
            "Model node: re-forward decisions by outcome (protocol §10.5).",
            labels=["outcome"],
        )
        for outcome in OUTCOMES:
            family.add_metric([outcome], self._reforwarder.outcomes.get(outcome, 0))
        yield family
