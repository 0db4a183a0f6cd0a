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
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp

from node.client._errors import UnknownModel
from node.client._service import ServedModel
from node.inference import InvalidParams
from node.overlay import (
    ClientSettings,
    CompletionDelta,
    CompletionRequest,
    Directory,
    ReplyIncomplete,
    Route,
    complete,
)
from node.overlay._directory import common_suspects, suspect_relays
from node.privacy import InsufficientRelays

log = logging.getLogger(__name__)

_MODEL_ID = re.compile(r"0x[0-9a-fA-F]{64}")

#: Produces the current directory (e.g. syncs the registry index and reads it); called at most every refresh.
DirectorySource = Callable[[], Awaitable[Directory]]


class Transport(Protocol):
    """Carries one request to ``route.destination`` and yields its deltas."""

    def send(self, request: CompletionRequest, route: Route) -> AsyncIterator[CompletionDelta]:
        """Send ``request`` over ``route``; raises ``ReplyIncomplete`` when the paths fail."""
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

    def _client_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit_per_host=self._limit_per_host),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            )
        return self._session

    def send(self, request: CompletionRequest, route: Route) -> AsyncIterator[CompletionDelta]:
        return complete(self._client_session(), request, route.paths, route.destination.hop(), self._settings)

    async def close(self) -> None:
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

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise InvalidParams(param="attempts", value=self.attempts, reason="at least 1")
        if not 1 <= self.hops <= 5:
            raise InvalidParams(param="hops", value=self.hops, reason="1..5 relays per path")
        if self.directory_refresh_s <= 0:
            raise InvalidParams(param="directory_refresh_s", value=self.directory_refresh_s, reason="positive")


@dataclass(slots=True)
class _DirectoryCache:
    directory: Directory | None = None
    fetched_at: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def _name_id(name: str) -> str:
    from ledger import model_id  # web3's keccak; imported when a name is first resolved

    return "0x" + model_id(name).hex()


class Client:
    """Sends private completion requests into the network. Use ``async with Client(...)`` or call :meth:`close`."""

    def __init__(
        self,
        directory: DirectorySource | Directory,
        config: ClientConfig | None = None,
        *,
        transport: Transport | None = None,
        on_route: Callable[[Route], None] | None = None,
    ) -> None:
        self.config = config or ClientConfig()
        self._source = directory
        self._cache = _DirectoryCache()
        self._transport: Transport = transport or OverlayTransport(ClientSettings(n=self.config.paths))
        self._on_route = on_route
        self._names: dict[str, str] = {}  # model id -> name@revision
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

    def served(self, directory: Directory, model_id: str) -> ServedModel:
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
            wanted = [model.lower()]
        elif "@" in model:
            try:
                wanted = [_name_id(model)]
            except Exception as exc:  # the ledger's InvalidChainInput: a malformed name
                raise UnknownModel(model) from exc
        else:
            # A bare name: its known revisions, the last configured first.
            wanted = [i for i, n in reversed(self._names.items()) if n.split("@", 1)[0] == model]
        for model_id in wanted:
            if directory.serving(model_id):
                return self.served(directory, model_id)
        raise UnknownModel(model)

    async def stream(self, request: CompletionRequest) -> AsyncGenerator[CompletionDelta, None]:
        """Route ``request`` and yield its deltas, re-routing a try that failed before any path answered."""
        directory = await self.directory()
        route = directory.route(request.model, n=self.config.paths, hops=self.config.hops)
        for attempt in range(1, self.config.attempts + 1):
            if self._on_route is not None:
                self._on_route(route)
            yielded = False
            try:
                async for delta in self._transport.send(request, route):
                    yielded = True
                    yield delta
                return
            except ReplyIncomplete as failure:
                early = not (failure.received or failure.started) and bool(failure.failed_early)
                if yielded or attempt == self.config.attempts or not early:
                    raise
                log.info("try %d failed before any path answered; re-routing around suspects", attempt)
                route = _reroute(directory, request.model, self.config.paths, self.config.hops, route, failure)

    async def complete(self, request: CompletionRequest) -> Completion:
        """The whole completion at once."""
        text: list[str] = []
        tokens: list[int] = []
        last: CompletionDelta | None = None
        async for delta in self.stream(request):
            text.append(delta.text)
            tokens.extend(delta.token_ids)
            last = delta
        assert last is not None and last.finish_reason is not None  # complete() raises before an unfinished end
        return Completion(
            text="".join(text),
            token_ids=tuple(tokens),
            finish_reason=last.finish_reason,
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            cached_tokens=last.cached_tokens,
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


def _reroute(directory: Directory, model: str, n: int, hops: int, route: Route, failure: ReplyIncomplete) -> Route:
    # The destination may be the culprit too (a dead model node fails every path the same way): prefer another one.
    avoid_nodes = (route.destination.operator,)
    for suspects in (suspect_relays(route, failure), common_suspects(route, failure)):
        try:
            return directory.route(model, n=n, hops=hops, avoid_relays=suspects, avoid_model_nodes=avoid_nodes)
        except InsufficientRelays:
            continue
    raise failure


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
