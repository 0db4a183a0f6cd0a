"""The application protocol inside the sealed envelope: a completion request in, a stream of JSON lines out
(``docs/protocol.md`` §10).

The model node's side is :func:`completion_handler`, which turns an :class:`~node.inference.Engine` into the overlay's
reply handler; the client's side is :func:`complete`, which sends a request over onion paths and yields typed deltas.
Everything here is JSON with strict schemas: a malformed or out-of-range field becomes one error line naming the field,
never a crash and never a silent default.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Literal, Protocol

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import from_json

from node.inference import (
    Engine,
    EngineOverloaded,
    GenerationChunk,
    GenerationRequest,
    InferenceError,
    InvalidParams,
    SamplingParams,
)
from node.overlay._client import ClientSettings, send_request
from node.overlay._directory import Directory, Route, reroute
from node.overlay._errors import OverlayError, ReplyIncomplete
from node.overlay._peers import Peer
from node.overlay._receiver import ReplyHandler
from node.privacy import RelayDescriptor

if TYPE_CHECKING:
    from ledger import AcceptedVoucher
    from node.overlay._payments import Payments
    from node.overlay._reforward import Reforwarder

log = logging.getLogger(__name__)

#: Longest prompt accepted over the overlay, in characters (§10.1): the sealed envelope must still fit one packet.
MAX_PROMPT_CHARS = 65_536
#: Longest reply line a client buffers, in bytes (§10.2): a line is one delta, far below this.
MAX_LINE_BYTES = 1 << 20
#: Bytes of reply a client accepts per requested token (plus :data:`REPLY_SLACK_TOKENS`): a delta line per token
#: with its text, id and log-prob is a few hundred bytes; a node streaming more is lying, and a client (a user's,
#: the OpenAI endpoint, a verifier collecting an audit) must not hold it without bound.
MAX_REPLY_BYTES_PER_TOKEN = 4096
#: Tokens' worth of reply allowed beyond ``max_tokens`` (the final delta, batching).
REPLY_SLACK_TOKENS = 4
_MODEL_ID = re.compile(r"0x[0-9a-f]{64}")


class CompletionError(OverlayError):
    """The model node answered the request with an error line (§10.3); ``code`` is the node's stable code."""

    status = 502

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        self.code = code
        self.param = param
        super().__init__(f"{code}: {message}")


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


_DECIMAL = r"^(0|[1-9][0-9]{0,77})$"


class VoucherWire(_Wire):
    """§10.4: a payment-channel voucher inside the sealed request (``ledger.Voucher.to_json()``'s shape).

    Only its shape is checked here; chain, contract, channel, signature and amount are the model node's
    ``PaymentGate``'s business. Its repr is redacted: the signature is the client's money.
    """

    chain_id: str = Field(alias="chainId", pattern=_DECIMAL)
    """Chain id, decimal string."""
    contract: str = Field(pattern=r"^0x[0-9a-fA-F]{40}$")
    """The ``PaymentChannels`` address."""
    channel_id: str = Field(alias="channelId", pattern=_DECIMAL)
    """Channel id, decimal string."""
    cumulative_amount: str = Field(alias="cumulativeAmount", pattern=_DECIMAL)
    """Wei owed on the channel in total, decimal string."""
    signature: str = Field(pattern=r"^0x[0-9a-fA-F]{130}$")
    """65 bytes r || s || v, 0x-hex."""

    def __repr__(self) -> str:
        return f"VoucherWire(channel={self.channel_id}, amount={self.cumulative_amount}, signature=<redacted>)"

    __str__ = __repr__

    def to_json(self) -> dict[str, str]:
        """The ``ledger.Voucher.from_json`` input."""
        return self.model_dump(by_alias=True)


class CompletionRequest(_Wire):
    """§10.1: what a client asks a model node for. Ranges are checked again by ``SamplingParams``."""

    v: Literal[1, 2] = 1
    """Protocol version of the application message: 2 may carry a ``voucher`` (§10.4)."""
    type: Literal["completion"] = "completion"
    """Message type."""
    model: str = Field(pattern=_MODEL_ID.pattern)
    """The on-chain model id, 0x + 64 lower-case hex (keccak of ``name@revision``)."""
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    """Prompt text, 1..65536 characters."""
    max_tokens: int = 16
    """Most tokens to generate, 1..4096."""
    temperature: float = 1.0
    """0..2; 0 is greedy."""
    top_p: float = 1.0
    """(0, 1]."""
    top_k: int = 0
    """0 disables."""
    seed: int | None = None
    """0..2**63-1 for reproducible sampling."""
    stop: tuple[str, ...] = ()
    """Up to four stop strings of 1..64 characters."""
    voucher: VoucherWire | None = None
    """v2 only: the payment voucher for the destination (§10.4). Never serialised when absent, so v1 stays v1."""
    forwarded: bool = False
    """§10.5: set by a model node that re-forwarded the request to a peer; a node never re-forwards such a request
    again (loop-free). Never serialised when false, so requests without it are byte for byte what they were."""

    @field_validator("voucher")
    @classmethod
    def _voucher_needs_v2(cls, voucher: VoucherWire | None, info: ValidationInfo) -> VoucherWire | None:
        if voucher is not None and info.data.get("v") != 2:
            raise ValueError("a voucher needs v = 2")
        return voucher

    def with_voucher(self, voucher: dict[str, str]) -> CompletionRequest:
        """This request as v2 carrying ``voucher`` (a ``ledger.Voucher.to_json()`` object)."""
        return self.model_copy(update={"v": 2, "voucher": VoucherWire.model_validate(voucher)})

    def __repr__(self) -> str:
        # Redacted: the prompt is private.
        shown = f"model={self.model[:10]}…, prompt=<{len(self.prompt)} chars>, max_tokens={self.max_tokens}"
        if self.voucher is not None:
            shown += ", voucher=<redacted>"
        if self.forwarded:
            shown += ", forwarded"
        return f"CompletionRequest({shown})"

    __str__ = __repr__

    def sampling(self) -> SamplingParams:
        """The engine's sampling parameters (raises ``InvalidParams`` naming the field out of range)."""
        return SamplingParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=self.stop,
        )

    def to_bytes(self) -> bytes:
        """Canonical UTF-8 JSON (the envelope body); a request without a voucher has no ``voucher`` key, one not
        re-forwarded no ``forwarded`` key."""
        exclude = {
            name for name, absent in (("voucher", self.voucher is None), ("forwarded", not self.forwarded)) if absent
        }
        return self.model_dump_json(by_alias=True, exclude=exclude or None).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> CompletionRequest:
        """Parse and validate; raises ``ValidationError`` naming the first bad field (bad JSON included)."""
        return cls.model_validate_json(data)


class CompletionDelta(_Wire):
    """§10.2: one streamed piece of the completion. The last one has ``finish_reason`` set."""

    text: str
    """New text."""
    token_ids: tuple[int, ...]
    """New token ids (what a verifier scores)."""
    finish_reason: Literal["stop", "length", "abort"] | None
    """None while streaming."""
    prompt_tokens: int = Field(ge=0)
    """Prompt length in tokens."""
    completion_tokens: int = Field(ge=0)
    """Completion tokens so far (cumulative)."""
    cached_tokens: int = Field(ge=0)
    """Prompt tokens served from the node's prefix cache."""
    logprobs: tuple[float, ...] = ()
    """Natural-log probability of each of ``token_ids`` under the raw distribution (what a verifier compares); empty
    when the engine reports none."""


class _ErrorBody(_Wire):
    code: str = Field(min_length=1, max_length=64)
    message: str = Field(max_length=1024)
    param: str | None = None


class _ErrorLine(_Wire):
    error: _ErrorBody


def _line(message: BaseModel) -> bytes:
    return message.model_dump_json().encode() + b"\n"


def _error_line(code: str, message: str, param: str | None = None) -> bytes:
    return _line(_ErrorLine(error=_ErrorBody(code=code, message=message[:1024], param=param)))


def _first_error(exc: ValidationError) -> tuple[str | None, str]:
    first = exc.errors(include_url=False, include_input=False)[0]
    loc = ".".join(str(p) for p in first["loc"]) or None
    return loc, str(first["msg"])


class RequestObserver(Protocol):
    """Sees each served request's shape (never its text beyond ``started``'s prompt, which stays in the node):
    the heartbeat publisher (TTFT, prefix counts), metrics, the per-request log line."""

    def started(self, prompt: str) -> None:
        """A valid request for this node's model is about to be generated."""
        ...

    def first_token(self, seconds: float) -> None:
        """Its first delta left ``seconds`` after it started."""
        ...

    def finished(
        self, *, prompt_tokens: int, completion_tokens: int, cached_tokens: int, finish_reason: str, seconds: float
    ) -> None:
        """It ended (``finish_reason`` is ``stop``, ``length``, ``abort`` or an error code)."""
        ...


def completion_handler(
    engine: Engine,
    *,
    observers: Sequence[RequestObserver] = (),
    payments: Payments | None = None,
    reforward: Reforwarder | None = None,
) -> ReplyHandler:
    """The model node's reply handler serving ``engine`` (plug it into ``create_app(config, handler)``).

    With ``payments`` the node is paying (§10.4): a request is served only after its voucher was accepted and
    committed, and is charged after it ends, whatever the outcome. Without, vouchers are ignored (free serving).
    Each request ends with one log line at INFO: its random id, token counts, cache hits, finish reason and timings,
    never prompt or answer text. With ``reforward``, a request accepted while the engine is over its queue bound may
    be served by a peer instead (§10.5): its deltas are relayed here unchanged and charged like the engine's own.
    """

    async def handle(body: bytes) -> AsyncIterator[bytes]:
        try:
            request = CompletionRequest.from_bytes(body)
        except ValidationError as exc:
            param, reason = _first_error(exc)
            yield _error_line("invalid_request", reason, param)
            return
        if request.model != engine.model_id:
            yield _error_line("model_not_served", "this node does not serve the requested model", "model")
            return
        accepted: AcceptedVoucher | None = None
        if payments is not None:
            from node.overlay._payments import PaymentRefused

            try:
                accepted = await payments.admit(request)
            except PaymentRefused as refused:
                log.info("request refused before inference: %s", refused.code)
                yield _error_line(refused.code, refused.message, refused.param)
                return
        request_id = secrets.token_hex(8)
        charged = False

        async def charge() -> None:
            # Before the reply's last line leaves: a client that sends its next voucher as soon as it reads that
            # line must find this reservation already replaced by the cost (else its voucher looks underpaid).
            nonlocal charged
            if payments is None or accepted is None or charged:
                return
            charged = True
            used = (last.prompt_tokens, last.completion_tokens) if last is not None else (0, 0)
            try:
                await payments.settle(accepted, prompt_tokens=used[0], completion_tokens=used[1])
            except Exception:  # the reservation stays and counts as used on restart: never lost, never crashes
                log.exception("could not settle request %s", request_id)

        started = finished = False
        begun = time.monotonic()
        outcome = "abort"
        last: GenerationChunk | None = None
        for observer in observers:
            observer.started(request.prompt)
        try:
            generation = GenerationRequest(request_id=request_id, prompt=request.prompt, params=request.sampling())
            stream = (
                engine.generate(generation) if reforward is None else reforward.generate(request, generation, engine)
            )
            started = True
            async with contextlib.aclosing(stream):
                async for chunk in stream:
                    if last is None:
                        for observer in observers:
                            observer.first_token(time.monotonic() - begun)
                    last = chunk
                    finished = chunk.finish_reason is not None
                    if chunk.finish_reason is not None:
                        outcome = chunk.finish_reason
                        await charge()
                    yield _line(
                        CompletionDelta(
                            text=chunk.text,
                            token_ids=chunk.token_ids,
                            finish_reason=chunk.finish_reason,
                            prompt_tokens=chunk.prompt_tokens,
                            completion_tokens=chunk.completion_tokens,
                            cached_tokens=chunk.cached_tokens,
                            logprobs=chunk.logprobs,
                        )
                    )
        except EngineOverloaded:
            outcome = "overloaded"
            await charge()
            yield _error_line("overloaded", "the model node is at capacity; retry later or elsewhere")
        except InvalidParams as exc:
            # About the request (a range, a prompt over the context): safe and useful to report; values are redacted.
            outcome = exc.code
            await charge()
            yield _error_line(exc.code, str(exc), exc.param)
        except InferenceError as exc:
            # About the node (closed, stalled): the code is enough, the details stay in the node's own logs.
            outcome = exc.code
            log.warning("completion failed: %s", exc.code)
            await charge()
            yield _error_line(exc.code, "the model node could not serve the request")
        finally:
            if started and not finished:
                # Closed before the last chunk: the receiver cancelled the reply because every path of the request
                # is gone (or it failed). Tell the engine through its protocol, whatever the engine does on close.
                await engine.abort(request_id)
            seconds = time.monotonic() - begun
            counts = {
                "prompt_tokens": last.prompt_tokens if last else 0,
                "completion_tokens": last.completion_tokens if last else 0,
                "cached_tokens": last.cached_tokens if last else 0,
            }
            await charge()  # aborted (every path gone): charge what was sent
            for observer in observers:
                observer.finished(**counts, finish_reason=outcome, seconds=seconds)
            log.info(
                "request %s: %s, %d prompt tokens (%d cached), %d generated, %.0f ms",
                request_id,
                outcome,
                counts["prompt_tokens"],
                counts["cached_tokens"],
                counts["completion_tokens"],
                seconds * 1000,
            )

    return handle


def _parse_line(line: bytes) -> CompletionDelta:
    try:
        # Not json.loads: a model node's line of 100,000 "[" would recurse on the C stack (py_ecc, imported with
        # web3, raises the recursion limit to 100,000) and crash the client or verifier; this parser stops at 200.
        data = from_json(line)
    except ValueError as exc:
        raise CompletionError("bad_reply", "the model node sent a line that is not JSON") from exc
    try:
        if isinstance(data, dict) and "error" in data:
            error = _ErrorLine.model_validate(data, strict=False).error
            raise CompletionError(error.code, error.message, error.param)
        return CompletionDelta.model_validate(data, strict=False)
    except ValidationError as exc:
        raise CompletionError("bad_reply", "the model node sent a malformed reply line") from exc


async def complete(
    session: aiohttp.ClientSession,
    request: CompletionRequest,
    paths: Sequence[Sequence[RelayDescriptor]],
    destination: Peer,
    settings: ClientSettings | None = None,
) -> AsyncIterator[CompletionDelta]:
    """Send ``request`` to the model node ``destination`` over ``paths`` and yield its deltas as they stream back.

    Raises :class:`CompletionError` for an error line, ``ReplyIncomplete`` when every path failed before the end, and
    ``InvalidPrivacyParam`` when the request is too large for one packet.
    """
    body = request.to_bytes()
    buffer = b""
    finished = False
    received = 0
    limit = MAX_REPLY_BYTES_PER_TOKEN * (request.max_tokens + REPLY_SLACK_TOKENS)
    async for data in send_request(session, body, paths, destination, settings):
        buffer += data
        received += len(data)
        if received > limit:
            raise CompletionError(
                "bad_reply", f"the reply is longer than {limit} bytes for {request.max_tokens} tokens"
            )
        if len(buffer) > MAX_LINE_BYTES and b"\n" not in buffer:
            raise CompletionError("bad_reply", f"a reply line is longer than {MAX_LINE_BYTES} bytes")
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            delta = _parse_line(line)
            if delta.completion_tokens > request.max_tokens:
                raise CompletionError("bad_reply", f"the reply has more than the {request.max_tokens} tokens asked for")
            yield delta
            if delta.finish_reason is not None:
                finished = True
    if buffer.strip() or not finished:
        raise CompletionError("bad_reply", "the reply ended without a final delta")


async def complete_routed(
    session: aiohttp.ClientSession,
    directory: Directory,
    request: CompletionRequest,
    *,
    hops: int = 3,
    settings: ClientSettings | None = None,
    attempts: int = 2,
    on_route: Callable[[Route], None] | None = None,
) -> AsyncGenerator[CompletionDelta, None]:
    """Route ``request`` with ``directory`` and :func:`complete` it, re-routing around dead relays.

    A try is repeated (up to ``attempts`` tries in all) only when it failed before any path answered (so the model
    node never rebuilt the request and nothing is served twice), over paths that avoid the suspects (every relay that
    could explain an early failure, or if that leaves too few, the relays that could explain all of them) and to
    another model node where one serves the model. ``on_route`` sees each route before it is tried.
    """
    if attempts < 1:
        raise InvalidParams(param="attempts", value=attempts, reason="at least 1")
    settings = settings or ClientSettings()
    route = directory.route(request.model, n=settings.n, hops=hops)
    for attempt in range(1, attempts + 1):
        if on_route is not None:
            on_route(route)
        try:
            async for delta in complete(session, request, route.paths, route.destination.peer(), settings):
                yield delta
            return
        except ReplyIncomplete as failure:
            if attempt == attempts or failure.received or failure.started or not failure.failed_early:
                raise
            log.info("try %d failed before any path answered; re-routing around suspects", attempt)
            route = reroute(directory, request.model, n=settings.n, hops=hops, route=route, failure=failure)
