"""The ``Client``: the paper's user node. One object owns one workflow: the directory, routing, retries, transport.

``ps-client``, the OpenAI-compatible endpoint and the verifier all send through a ``Client``, so their traffic is the
same kind byte for byte. A :class:`Transport` carries one routed request (as httpx separates a client from its
transport): :class:`OverlayTransport` sends S-IDA cloves over onion paths; a test or benchmark may pass an
in-memory one.

Retries follow one rule: a try is repeated only when it failed before any path answered, so the model node never
rebuilt the request and nothing is served (or paid) twice. A retry avoids the relays that can explain the failure and
prefers another model node.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import aiohttp

from node.client._errors import UnknownModel
from node.client._heartbeats import HeartbeatMonitor, load_report
from node.client._policy import NEUTRAL_REPUTATION, POLICIES, LoadTracker, NodeView, Policy, make_policy
from node.client._service import ServedModel
from node.inference import InvalidParams
from node.inference._prefix import CHUNK_TOKENS, chunk_hashes
from node.overlay import (
    ClientSettings,
    CompletionDelta,
    CompletionError,
    CompletionRequest,
    Directory,
    ReplyIncomplete,
    Route,
    SessionClosed,
    complete,
)
from node.overlay._directory import ModelNode, NoModelNode, reroute
from node.overlay._heartbeat import HEARTBEAT_PATH, MAX_HEARTBEAT_BYTES
from planetserve import InvalidValue, ModelId

if TYPE_CHECKING:
    from node.client._wallet import Wallet

log = logging.getLogger(__name__)

_MODEL_ID = re.compile(r"0x[0-9a-fA-F]{64}")

#: Most nodes added to a request's sampled candidates because this client sent them the prompt's prefix before
#: (the deepest remembered chunk's node first): affinity survives the sampling, and the set stays bounded.
MAX_PREFIX_HOLDERS = 2

#: Produces the current directory (e.g. syncs the registry index and reads it); called at most every refresh.
DirectorySource = Callable[[], Awaitable[Directory]]


class Transport(Protocol):
    """Carries one request to ``route.destination`` and yields its deltas."""

    def send(self, request: CompletionRequest, route: Route) -> AsyncIterator[CompletionDelta]:
        """Send ``request`` over ``route``; raises ``ReplyIncomplete`` when the paths fail."""
        ...

    async def fetch_heartbeat(self, endpoint: str) -> bytes:
        """The raw signed heartbeat the model node at ``endpoint`` serves (bounded in size and time)."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class OverlayTransport:
    """The real transport: sealed S-IDA cloves over the route's onion paths (``node.overlay.complete``)."""

    def __init__(self, settings: ClientSettings | None = None, *, limit_per_host: int = 32) -> None:
        self._settings = settings or ClientSettings()
        self._limit_per_host = limit_per_host
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def _client_session(self) -> aiohttp.ClientSession:
        # A request started after close() (a task the owner did not stop first) must fail, not open a session that
        # nothing closes any more.
        if self._closed:
            raise SessionClosed("client transport")
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit_per_host=self._limit_per_host),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            )
        return self._session

    def send(self, request: CompletionRequest, route: Route) -> AsyncIterator[CompletionDelta]:
        return complete(self._client_session(), request, route.paths, route.destination.peer(), self._settings)

    async def fetch_heartbeat(self, endpoint: str) -> bytes:
        session = self._client_session()
        try:
            async with session.get(
                endpoint + HEARTBEAT_PATH, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=2.0)
            ) as response:
                if response.status != 200:
                    raise OSError(f"heartbeat answered {response.status}")
                # ``read(n)`` returns what has arrived, up to n: read on to the end, never past the bound plus one.
                body = b""
                while len(body) <= MAX_HEARTBEAT_BYTES and (
                    part := await response.content.read(MAX_HEARTBEAT_BYTES + 1 - len(body))
                ):
                    body += part
                if len(body) > MAX_HEARTBEAT_BYTES:
                    raise ValueError("heartbeat too large")
                return body
        except aiohttp.ClientError as exc:
            # Not every aiohttp failure is an OSError (a node that drops the connection, a body cut short): as one,
            # it makes the node count as not answering instead of failing the request that polled it.
            raise OSError(f"heartbeat not read: {type(exc).__name__}") from exc

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientConfig:
    """How a client routes and retries."""

    paths: int = 4
    """Cloves and paths per request, ``n``."""
    hops: int = 3
    """Relays per path, ``L``."""
    attempts: int = 2
    """Routes tried when a try fails before any path answered (1: no retry)."""
    directory_refresh_s: float = 5.0
    """Longest a directory is used before it is rebuilt, seconds."""
    models: tuple[str, ...] = ()
    """``name@revision`` of models this client names (the chain stores only their keccak ids)."""
    policy: str = "planetserve"
    """Forwarding policy: ``round_robin``, ``least_load``, ``prefix_only`` or ``planetserve``."""
    heartbeats: bool = True
    """Fetch and use model nodes' signed heartbeats (load, cache summary); silent nodes are avoided."""
    heartbeat_refresh_s: float = 0.5
    """Heartbeats older than this are fetched again before routing, seconds."""
    heartbeat_max_age_s: float = 5.0
    """A heartbeat older than this does not count, seconds."""
    memory_entries: int = 4096
    """Prefix chunks this client remembers having sent, and where (its own affinity memory; never sent anywhere)."""
    candidates: int = 16
    """Model nodes weighed per request (0: every serving node): a random sample of this many, plus the nodes this
    client remembers sending the prompt's prefix to (at most ``MAX_PREFIX_HOLDERS``). Only their heartbeats are
    fetched, so a client's heartbeat traffic stays bounded however many nodes serve the model (power of d choices;
    ``bench/forwarding.py``'s scale run). Over a sample, ``round_robin`` rotates over a different set each time."""

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise InvalidParams(param="attempts", value=self.attempts, reason="at least 1")
        if not 1 <= self.hops <= 5:
            raise InvalidParams(param="hops", value=self.hops, reason="1..5 relays per path")
        if self.directory_refresh_s <= 0:
            raise InvalidParams(param="directory_refresh_s", value=self.directory_refresh_s, reason="positive")
        if self.policy not in POLICIES:
            raise InvalidParams(param="policy", value=self.policy, reason=f"one of {', '.join(POLICIES)}")
        if self.candidates < 0:
            raise InvalidParams(param="candidates", value=self.candidates, reason="0 (all) or more")


@dataclass(slots=True)
class _DirectoryCache:
    directory: Directory | None = None
    fetched_at: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def _name_id(name: str) -> ModelId:
    return ModelId.of(name)  # raises the kernel's InvalidValue for a malformed name


class Client:
    """Sends private completion requests into the network. Use ``async with Client(...)`` or call :meth:`close`."""

    def __init__(
        self,
        directory: DirectorySource | Directory,
        config: ClientConfig | None = None,
        *,
        transport: Transport | None = None,
        on_route: Callable[[Route], None] | None = None,
        tokenizer: Callable[[str], Sequence[int]] | None = None,
        reputation: Callable[[str], float] | None = None,
        rng: random.Random | None = None,
        wallet: Wallet | None = None,
    ) -> None:
        self.config = config or ClientConfig()
        self.wallet = wallet
        self._source = directory
        self._cache = _DirectoryCache()
        self._transport: Transport = transport or OverlayTransport(ClientSettings(n=self.config.paths))
        self._on_route = on_route
        self._tokenizer = tokenizer
        self._reputation = reputation or (lambda _operator: NEUTRAL_REPUTATION)
        self._rng = rng or random.Random()
        self.policy: Policy = make_policy(self.config.policy)
        self.load = LoadTracker()
        self.heartbeats = HeartbeatMonitor(
            fetch=self._transport.fetch_heartbeat, max_age_s=self.config.heartbeat_max_age_s
        )
        # When each node's heartbeat was last fetched (monotonic): one entry per model node of the registry.
        self._fetched_at: dict[str, float] = {}
        self._memory: OrderedDict[bytes, str] = OrderedDict()
        self._names: dict[ModelId, str] = {}  # model id -> name@revision
        for name in self.config.models:
            self._names[_name_id(name)] = name

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the transport's connections."""
        await self._transport.close()

    async def directory(self) -> Directory:
        """The current directory (rebuilt from the source when older than ``directory_refresh_s``)."""
        if isinstance(self._source, Directory):
            return self._source
        async with self._cache.lock:
            now = time.monotonic()
            if self._cache.directory is None or now - self._cache.fetched_at >= self.config.directory_refresh_s:
                self._cache.directory = await self._source()
                self._cache.fetched_at = now
            return self._cache.directory

    def served(self, directory: Directory, model_id: ModelId) -> ServedModel:
        """``model_id`` as a :class:`ServedModel` of ``directory``, named where this client knows the name."""
        return ServedModel(
            name=self._names.get(model_id, model_id), model_id=model_id, nodes=len(directory.serving(model_id))
        )

    async def list_models(self) -> list[ServedModel]:
        """Models with at least one routable model node, named where this client knows the name."""
        directory = await self.directory()
        ids = sorted({m.model_id for m in directory.model_nodes})
        return [self.served(directory, i) for i in ids]

    async def resolve(self, model: str) -> ServedModel:
        """``name@revision``, a bare name or a 0x id, to a model with routable nodes (else ``UnknownModel``)."""
        return self.resolve_in(await self.directory(), model)

    def resolve_in(self, directory: Directory, model: str) -> ServedModel:
        """:meth:`resolve` against a given directory (no I/O)."""
        if _MODEL_ID.fullmatch(model):
            wanted = [ModelId(model)]
        elif "@" in model:
            try:
                wanted = [_name_id(model)]
            except InvalidValue as exc:  # a malformed name
                raise UnknownModel(model) from exc
        else:
            # A bare name: its known revisions, the last configured first.
            wanted = [i for i, n in reversed(self._names.items()) if n.split("@", 1)[0] == model]
            if not wanted:
                # The chain stores only keccak(name@revision): a bare name means nothing without its revisions.
                raise UnknownModel(model, "a bare name resolves only among the NAME@REVISION names this client has")
        for model_id in wanted:
            if directory.serving(model_id):
                return self.served(directory, model_id)
        raise UnknownModel(model)

    async def _refresh_heartbeats(self, nodes: Sequence[ModelNode]) -> None:
        """Fetch the heartbeats of ``nodes`` last fetched ``heartbeat_refresh_s`` ago or more (per node: each request
        samples its own candidates)."""
        if not self.config.heartbeats:
            return
        now = time.monotonic()
        every = self.config.heartbeat_refresh_s
        due = [m for m in nodes if now - self._fetched_at.get(m.operator, -float("inf")) >= every]
        for m in due:
            self._fetched_at[m.operator] = now
        if due:
            await self.heartbeats.refresh(due)

    def _prefix_holders(self, hashes: Sequence[bytes]) -> list[str]:
        """Operators this client sent the prompt's prefix to, the deepest chunk's first (at most
        ``MAX_PREFIX_HOLDERS``)."""
        holders: list[str] = []
        for h in reversed(hashes):
            operator = self._memory.get(h)
            if operator is not None and operator not in holders:
                holders.append(operator)
                if len(holders) == MAX_PREFIX_HOLDERS:
                    break
        return holders

    def candidates(
        self, serving: Sequence[ModelNode], hashes: Sequence[bytes], *, to: str | None = None
    ) -> list[ModelNode]:
        """The nodes weighed for one request (``ClientConfig.candidates``): a fresh random sample of ``serving``,
        the prompt's remembered prefix holders, then ``to``'s node (a pinned request samples like any other, so the
        heartbeats it fetches do not single out its target)."""
        k = self.config.candidates
        if k == 0 or len(serving) <= k:
            return list(serving)
        chosen = self._rng.sample(list(serving), k)
        have = {m.operator.lower() for m in chosen}
        by_operator = {m.operator.lower(): m for m in serving}
        extra = [*self._prefix_holders(hashes), *([to] if to is not None else [])]
        for operator in extra:
            node = by_operator.get(operator.lower())
            if node is not None and operator.lower() not in have:
                chosen.append(node)
                have.add(operator.lower())
        return chosen

    def _prompt_hashes(self, prompt: str) -> tuple[int, list[bytes]]:
        """(prompt tokens, chained chunk hashes), computed here: the prompt never leaves the client for this."""
        if self._tokenizer is None:
            return max(1, len(prompt) // 4), []
        ids = list(self._tokenizer(prompt))
        return len(ids), chunk_hashes(ids)

    def _remembered(self, hashes: Sequence[bytes], operator: str) -> int:
        for i in range(len(hashes), 0, -1):
            if self._memory.get(hashes[i - 1]) == operator:
                return i
        return 0

    def _remember(self, hashes: Sequence[bytes], operator: str) -> None:
        for h in hashes:
            self._memory[h] = operator
            self._memory.move_to_end(h)
        while len(self._memory) > self.config.memory_entries:
            self._memory.popitem(last=False)

    def choose(
        self, candidates: Sequence[ModelNode], prompt_tokens: int, hashes: Sequence[bytes], max_tokens: int = 0
    ) -> tuple[ModelNode, NodeView]:
        """The model node the policy picks for a prompt asking for up to ``max_tokens``, and the view it was picked
        on (each node's last heartbeat plus this client's own requests sent there since, ``LoadTracker.view``)."""
        if self.config.heartbeats:
            answering = [m for m in candidates if not self.heartbeats.silent(m.operator)]
            candidates = answering or list(candidates)  # when none answers, try anyway rather than refuse
        views = []
        now = time.time()  # the clock of heartbeats' issued_at and of LoadTracker.dispatched
        for node in candidates:
            beat = self.heartbeats.latest(node.operator) if self.config.heartbeats else None
            matched = 0
            if beat is not None and beat.summary is not None and hashes:
                matched = beat.summary.matched_chunks(hashes)
            matched = max(matched, self._remembered(hashes, node.operator))
            views.append(
                self.load.view(
                    node.operator,
                    report=load_report(beat) if beat is not None else None,
                    matched_tokens=matched * CHUNK_TOKENS,
                    reputation=self._reputation(node.operator),
                    now=now,
                )
            )
        index = self.policy.choose(views, prompt_tokens, self._rng, max_tokens)
        return candidates[index], views[index]

    async def stream(
        self, request: CompletionRequest, *, to: str | None = None
    ) -> AsyncGenerator[CompletionDelta, None]:
        """Route ``request`` and yield its deltas, re-routing a try that failed before any path answered.

        ``to`` (an operator address) pins the model node instead of the forwarding policy: a verifier picks whom it
        audits. Everything else is what a user's request gets (heartbeat refresh, paths, payment, retries), so the
        node sees the same traffic; a retry keeps the pinned node and only changes relays.
        """
        directory = await self.directory()
        serving = directory.serving(request.model)
        if not serving:
            raise NoModelNode(request.model)
        prompt_tokens, hashes = self._prompt_hashes(request.prompt)
        # The sampled candidates' heartbeats, pinned or not: an audit's target must not be the one node it polled.
        serving = self.candidates(serving, hashes, to=to)
        await self._refresh_heartbeats(serving)
        if to is not None:
            serving = [m for m in serving if m.operator.lower() == to.lower()]
            if not serving:
                raise NoModelNode(request.model)
        destination, view = self.choose(serving, prompt_tokens, hashes, request.max_tokens)
        route = directory.route(request.model, n=self.config.paths, hops=self.config.hops, destination=destination)
        avoid: set[str] = set()
        for attempt in range(1, self.config.attempts + 1):
            if self._on_route is not None:
                self._on_route(route)
            paid, payment = request, None
            if self.wallet is not None:  # a voucher for this destination only: a retry elsewhere pays elsewhere
                counted = prompt_tokens if self._tokenizer is not None else None
                paid, payment = await self.wallet.pay(destination, request, counted)
            sent_to = destination.operator
            # Heartbeats are stamped in unix time: a request sent after one was issued is added to it.
            sent = self.load.dispatched(
                view, prompt_tokens=prompt_tokens, max_tokens=request.max_tokens, at=time.time()
            )
            self._remember(hashes, sent_to)
            started = time.monotonic()
            first_at = 0.0
            yielded = False
            seen: CompletionDelta | None = None
            used: int | None = None  # None: unknown, the node may have charged the whole reservation
            try:
                async for delta in self._transport.send(paid, route):
                    if not yielded:
                        first_at = time.monotonic()
                        self.load.first_token(sent, ttft_s=first_at - started)
                    if not yielded and payment is not None and self.wallet is not None:
                        self.wallet.admitted(payment)  # the node accepted the voucher: the channel's next may go
                    yielded = True
                    seen = delta
                    if delta.finish_reason is not None:
                        used = delta.prompt_tokens + delta.completion_tokens
                    yield delta
                return
            except CompletionError:
                # An error line: the node charged the last delta it sent (nothing when it refused before serving).
                used = seen.prompt_tokens + seen.completion_tokens if seen is not None else 0
                raise
            except ReplyIncomplete as failure:
                early = not (failure.received or failure.started) and bool(failure.failed_early)
                if early and not yielded:
                    used = 0  # no path answered: the node never rebuilt the request, nor saw its voucher
                if yielded or attempt == self.config.attempts or not early:
                    raise
                log.info("try %d failed before any path answered; re-routing around suspects", attempt)
                # The destination may be the culprit too (a dead model node fails every path alike): prefer another.
                avoid.add(sent_to)
                remaining = [m for m in serving if m.operator not in avoid] or serving
                destination, view = self.choose(remaining, prompt_tokens, hashes, request.max_tokens)
                route = reroute(
                    directory,
                    request.model,
                    n=self.config.paths,
                    hops=self.config.hops,
                    route=route,
                    failure=failure,
                    destination=destination,
                )
            finally:
                generated = seen.completion_tokens if seen is not None and seen.finish_reason is not None else 0
                self.load.finished(sent, decode_s=time.monotonic() - first_at if first_at else 0.0, tokens=generated)
                if payment is not None and self.wallet is not None:
                    self.wallet.finish(payment, used)

    async def complete(self, request: CompletionRequest, *, to: str | None = None) -> Completion:
        """The whole completion at once (``to``: as in :meth:`stream`)."""
        text: list[str] = []
        tokens: list[int] = []
        logprobs: list[float] = []
        last: CompletionDelta | None = None
        async for delta in self.stream(request, to=to):
            text.append(delta.text)
            tokens.extend(delta.token_ids)
            logprobs.extend(delta.logprobs)
            last = delta
        assert last is not None and last.finish_reason is not None  # complete() raises before an unfinished end
        return Completion(
            text="".join(text),
            token_ids=tuple(tokens),
            finish_reason=last.finish_reason,
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            cached_tokens=last.cached_tokens,
            logprobs=tuple(logprobs) if len(logprobs) == len(tokens) else (),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Completion:
    """A finished completion."""

    text: str = field(repr=False)
    """The generated text (private)."""
    token_ids: tuple[int, ...] = field(repr=False)
    """The generated token ids."""
    finish_reason: str
    """``stop``, ``length`` or ``abort``."""
    prompt_tokens: int
    """Prompt length, tokens."""
    completion_tokens: int
    """Generated tokens."""
    cached_tokens: int
    """Prompt tokens the model node served from its prefix cache."""
    logprobs: tuple[float, ...] = field(default=(), repr=False)
    """The node's natural-log probability of each of ``token_ids`` (protocol §10.2); empty when a delta reported
    none (then none are kept, so the two stay aligned). What a verifier compares with its reference."""


class ClientService:
    """A :class:`~node.client.CompletionService` over a :class:`Client` (what the OpenAI endpoint is given).

    ``models``/``resolve_model`` answer from the directory the client last fetched; :meth:`refresh` renews it (the
    endpoint's app calls it on a timer).
    """

    def __init__(self, client: Client) -> None:
        self.client = client
        self._models: list[ServedModel] = []
        self._directory: Directory | None = None

    async def refresh(self) -> None:
        """Fetch the directory and the model list now."""
        self._directory = await self.client.directory()
        self._models = await self.client.list_models()

    def models(self) -> Sequence[ServedModel]:
        return list(self._models)

    def resolve_model(self, model: str) -> ServedModel:
        if self._directory is None:
            raise UnknownModel(model)
        return self.client.resolve_in(self._directory, model)

    def stream(self, request: CompletionRequest) -> AsyncIterator[CompletionDelta]:
        return self.client.stream(request)
