"""Signed heartbeats: what a model node tells clients about its load and its prefix cache (``docs/forwarding.md``).

A heartbeat is a small JSON message signed by the node's **operator key** (EIP-191 over a domain-separated canonical
encoding), so a client checks it against the operator address registered on chain: nobody can speak for a node, and
a node cannot speak for another. It carries a sequence number and its time of issue; a client drops a heartbeat that
is older than it accepts, from the future, or not newer than the last one it saw.

The cache summary must not leak prompts. Chained chunk hashes of a prompt would let anyone who reads a heartbeat
confirm a guessed prompt, so a node advertises only the prefix chunks it has seen in at least ``k_distinct`` distinct
requests (a prefix that many requests share is not one user's secret) and that it still holds, each hashed again
under a random salt the node draws per epoch, in a Bloom filter of bounded size. Clients compute their prompt's chunk
hashes locally, salt them with the advertised salt and test membership; nothing about their prompt leaves them.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, model_validator

from node.inference import EngineStats
from node.overlay._errors import OverlayError

#: Where a model node serves its latest signed heartbeat (GET, ``application/json``).
HEARTBEAT_PATH = "/overlay/v1/heartbeat"
#: Domain separation of the signed bytes (never valid as a transaction or another message of ours).
HEARTBEAT_DOMAIN = b"planetserve/v1/heartbeat\n"
#: Largest Bloom filter a client accepts, bytes (a 4096-chunk summary at 1% false positives is about 4.9 KiB).
MAX_SUMMARY_BYTES = 16_384
#: Largest heartbeat body a client reads, bytes.
MAX_HEARTBEAT_BYTES = 32_768
#: Largest integer a heartbeat field may carry (§11.1): past 2**53 a float no longer holds it, and readers compute
#: with floats (a node's ``queued_tokens = 10**400`` made every client's cost estimate raise ``OverflowError``).
MAX_HEARTBEAT_INT = 2**53
#: Largest time a heartbeat field may carry, ms (about 11.6 days; §11.1).
MAX_HEARTBEAT_MS = 1e9


class HeartbeatRejected(OverlayError):
    """A heartbeat failed a check (signature, signer, freshness, sequence, size); ``reason`` says which."""

    code = "network_heartbeat_rejected"
    status = 400

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"heartbeat rejected: {reason}")


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class CacheSummary(_Wire):
    """Which prefix chunks a node holds, as a salted Bloom filter."""

    epoch: int = Field(ge=0, le=MAX_HEARTBEAT_INT)
    """Summary epoch (``issued_at // epoch_s``); the salt changes with it."""
    salt: str = Field(pattern=r"^[0-9a-f]{32}$")
    """16 random bytes (hex) the node drew for this epoch."""
    hashes: int = Field(ge=1, le=16)
    """Bloom hash functions, k."""
    bits: str = Field(max_length=4 * MAX_SUMMARY_BYTES // 3 + 4)
    """The filter, base64 (``m = 8 * len`` bits)."""
    entries: int = Field(ge=0, le=MAX_HEARTBEAT_INT)
    """Chunks inserted."""

    def _filter(self) -> bytes:
        return base64.b64decode(self.bits, validate=True)

    def contains(self, chunk_hash: bytes) -> bool:
        """Whether the chunk with chained hash ``chunk_hash`` is (probably) held."""
        return _bloom_has(self._filter(), bytes.fromhex(self.salt), self.hashes, chunk_hash)

    def matched_chunks(self, prompt_hashes: Sequence[bytes]) -> int:
        """Leading chunks of a prompt the node (probably) holds: the longest chained hash found, scanning down."""
        bloom, salt = self._filter(), bytes.fromhex(self.salt)
        if not bloom:
            return 0
        for i in range(len(prompt_hashes), 0, -1):
            if _bloom_has(bloom, salt, self.hashes, prompt_hashes[i - 1]):
                return i
        return 0


#: Fields added by heartbeat version 2 (the decode backlog); a version-1 heartbeat carries none of them.
V2_FIELDS = frozenset({"decode_backlog_tokens", "decode_ms_per_token"})
#: Fields added by heartbeat version 3 (the prefill speed); a version-1 or -2 heartbeat carries none of them.
V3_FIELDS = frozenset({"prefill_ms_per_token"})


class Heartbeat(_Wire):
    """A model node's load and cache, as it reports them (version 3; versions 1 and 2 still parse and verify).

    Version 1 (nodes before the decode backlog) signs exactly its own fields; version 2 adds
    ``decode_backlog_tokens`` and ``decode_ms_per_token``, version 3 ``prefill_ms_per_token``, each signing the
    fields of its version. A reader treats an older heartbeat as one whose later fields are unknown (they read 0),
    and refuses one that carries a field of a later version than it claims (``docs/protocol.md`` §11).
    """

    v: Literal[1, 2, 3] = 3
    """Message version."""
    node: str = Field(pattern=r"^0x[0-9a-fA-F]{40}$")
    """Operator address (the registry id) of the node."""
    model: str = Field(pattern=r"^0x[0-9a-f]{64}$")
    """The served model id."""
    seq: int = Field(ge=0, le=MAX_HEARTBEAT_INT)
    """Increases with every heartbeat the node issues."""
    issued_at_ms: int = Field(ge=0, le=MAX_HEARTBEAT_INT)
    """Unix milliseconds."""
    queued_requests: int = Field(ge=0, le=MAX_HEARTBEAT_INT)
    """Requests waiting for admission."""
    running_requests: int = Field(ge=0, le=MAX_HEARTBEAT_INT)
    """Requests being generated."""
    queued_tokens: int = Field(ge=0, le=MAX_HEARTBEAT_INT)
    """Prompt tokens still to prefill ahead of a new request (queued prompts plus the rest of those prefilling)."""
    ttft_ms_p50: float = Field(ge=0, le=MAX_HEARTBEAT_MS)
    """Median time to first token over the recent window, ms (0 when idle)."""
    summary: CacheSummary | None = None
    """The prefix-cache summary (None when the node advertises none)."""
    decode_backlog_tokens: int = Field(default=0, ge=0, le=MAX_HEARTBEAT_INT)
    """v2: tokens still to generate by the node's queued and running requests (0 in v1: unknown)."""
    decode_ms_per_token: float = Field(default=0.0, ge=0, le=MAX_HEARTBEAT_MS)
    """v2: the node's own measured decode time per generated token (a batched decode step's time per sequence,
    averaged over recent steps), ms (0: unknown)."""
    prefill_ms_per_token: float = Field(default=0.0, ge=0, le=MAX_HEARTBEAT_MS)
    """v3: the node's own measured prefill time per prompt token (its prefill forwards' time over the tokens they
    computed, averaged over recent steps), ms (0: unknown). Lets a client know a slow node is slow before sending
    it anything; the client still corrects it by the TTFT it measures."""

    @model_validator(mode="after")
    def _version_fields(self) -> Heartbeat:
        if self.v == 1 and self.model_fields_set & V2_FIELDS:
            raise ValueError("a version-1 heartbeat carries no decode backlog fields")
        if self.v < 3 and self.model_fields_set & V3_FIELDS:
            raise ValueError(f"a version-{self.v} heartbeat carries no prefill speed")
        return self

    def signing_bytes(self) -> bytes:
        """The exact bytes the operator signs: the canonical JSON of the fields of its version."""
        exclude = {1: V2_FIELDS | V3_FIELDS, 2: V3_FIELDS}.get(self.v)
        return HEARTBEAT_DOMAIN + self.model_dump_json(exclude=set(exclude) if exclude else None).encode()


class SignedHeartbeat(_Wire):
    """A heartbeat and its operator's signature: what ``GET /overlay/v1/heartbeat`` serves."""

    heartbeat: Heartbeat
    signature: str = Field(pattern=r"^0x[0-9a-f]{130}$")
    """65-byte EIP-191 signature, hex."""

    def signer(self) -> str:
        """The checksummed address that signed (raises ``HeartbeatRejected`` on a malformed signature)."""
        from eth_account import Account
        from eth_account.messages import encode_defunct

        try:
            return str(
                Account.recover_message(
                    encode_defunct(self.heartbeat.signing_bytes()), signature=bytes.fromhex(self.signature[2:])
                )
            )
        except Exception as exc:  # eth-keys raises several classes for a bad signature; all mean the same here
            raise HeartbeatRejected("bad signature") from exc


def sign_heartbeat(heartbeat: Heartbeat, account: object) -> SignedHeartbeat:
    """Sign with the operator's ``eth_account`` ``LocalAccount``."""
    from eth_account.messages import encode_defunct

    signed = account.sign_message(encode_defunct(heartbeat.signing_bytes()))  # type: ignore[attr-defined]
    return SignedHeartbeat(heartbeat=heartbeat, signature="0x" + bytes(signed.signature).hex())


@dataclass(slots=True)
class HeartbeatCheck:
    """A client's acceptance rule for one node's heartbeats (it keeps one per node, with the last ``seq``)."""

    operator: str
    """The registered operator address the heartbeat must be signed by."""
    model_id: str
    """The model the node is registered for."""
    max_age_s: float = 5.0
    """Oldest heartbeat accepted, seconds."""
    max_skew_s: float = 2.0
    """How far in the future ``issued_at`` may be (clock skew), seconds."""
    last_seq: int = -1

    def accept(self, signed: SignedHeartbeat, *, now: float | None = None) -> Heartbeat:
        """Return the heartbeat if it passes every check, else raise ``HeartbeatRejected`` naming the first failure."""
        hb = signed.heartbeat
        now = time.time() if now is None else now
        if hb.node.lower() != self.operator.lower():
            raise HeartbeatRejected("for another node")
        if hb.model != self.model_id.lower():
            raise HeartbeatRejected("for another model")
        age = now - hb.issued_at_ms / 1000
        if age > self.max_age_s:
            raise HeartbeatRejected("stale")
        if age < -self.max_skew_s:
            raise HeartbeatRejected("from the future")
        if hb.seq <= self.last_seq:
            raise HeartbeatRejected("not newer than the last one")
        if signed.signer().lower() != self.operator.lower():
            raise HeartbeatRejected("not signed by the node's operator")
        self.last_seq = hb.seq
        return hb


def _positions(salt: bytes, hashes: int, m_bits: int, chunk_hash: bytes) -> list[int]:
    digest = hashlib.blake2b(chunk_hash, key=salt, digest_size=16).digest()
    h1 = int.from_bytes(digest[:8], "little")
    h2 = int.from_bytes(digest[8:], "little") | 1
    return [(h1 + i * h2) % m_bits for i in range(hashes)]


def _bloom_has(bloom: bytes, salt: bytes, hashes: int, chunk_hash: bytes) -> bool:
    if not bloom:
        return False
    return all(bloom[p >> 3] >> (p & 7) & 1 for p in _positions(salt, hashes, 8 * len(bloom), chunk_hash))


def bloom_size(entries: int, false_positive_rate: float) -> tuple[int, int]:
    """(bytes, hash functions) of a Bloom filter for ``entries`` at ``false_positive_rate``."""
    entries = max(1, entries)
    bits = math.ceil(-entries * math.log(false_positive_rate) / math.log(2) ** 2)
    hashes = max(1, min(16, round(bits / entries * math.log(2))))
    return (bits + 7) // 8, hashes


@dataclass(slots=True, kw_only=True)
class CacheSummaryBuilder:
    """The node's side of the cache summary: counts distinct requests per chunk, builds the salted filter."""

    k_distinct: int = 3
    """A chunk is advertised only once at least this many distinct requests carried it."""
    max_entries: int = 4096
    """Most chunks advertised (the most recently used ones the engine still holds)."""
    false_positive_rate: float = 0.01
    """The filter's target false-positive rate."""
    epoch_s: float = 3600.0
    """How long one salt is used, seconds."""
    tracked: int = 65_536
    """Most chunk hashes whose request counts are kept (LRU): bounded memory whatever the traffic."""
    _counts: OrderedDict[bytes, int] = field(default_factory=OrderedDict)
    _salts: dict[int, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.k_distinct < 1:
            raise ValueError("k_distinct must be at least 1")
        if not 0.0 < self.false_positive_rate < 1.0:
            raise ValueError("false_positive_rate must be in (0, 1)")
        if bloom_size(self.max_entries, self.false_positive_rate)[0] > MAX_SUMMARY_BYTES:
            raise ValueError("max_entries too large for the summary size limit")

    def observe(self, prompt_hashes: Iterable[bytes]) -> None:
        """One request carried these chained chunk hashes (each counted once per request)."""
        for h in dict.fromkeys(prompt_hashes):
            self._counts[h] = self._counts.get(h, 0) + 1
            self._counts.move_to_end(h)
        while len(self._counts) > self.tracked:
            self._counts.popitem(last=False)

    def advertised(self, cached: Iterable[bytes]) -> list[bytes]:
        """Of the chunks the engine holds (most recently used first), those seen in ``k_distinct`` requests."""
        out = [h for h in cached if self._counts.get(h, 0) >= self.k_distinct]
        return out[: self.max_entries]

    def _salt(self, epoch: int) -> bytes:
        salt = self._salts.get(epoch)
        if salt is None:
            self._salts = {epoch: secrets.token_bytes(16)}  # older salts are dropped: old summaries unlinkable
            salt = self._salts[epoch]
        return salt

    def build(self, cached: Iterable[bytes], *, now: float | None = None) -> CacheSummary:
        """The summary of ``cached`` (the engine's cached chunk hashes) for the current epoch."""
        now = time.time() if now is None else now
        epoch = int(now // self.epoch_s)
        salt = self._salt(epoch)
        chunks = self.advertised(cached)
        # Sized for what is advertised (at least 64 chunks' worth): a quiet node's heartbeat stays small.
        size, hashes = bloom_size(max(64, len(chunks)), self.false_positive_rate)
        bloom = bytearray(size if chunks else 0)
        for h in chunks:
            for p in _positions(salt, hashes, 8 * size, h):
                bloom[p >> 3] |= 1 << (p & 7)
        return CacheSummary(
            epoch=epoch,
            salt=salt.hex(),
            hashes=hashes,
            bits=base64.b64encode(bytes(bloom)).decode(),
            entries=len(chunks),
        )


@dataclass(slots=True, kw_only=True)
class HeartbeatState:
    """Load figures the node's request handling reports (the publisher reads them each beat)."""

    window: int = 64
    """TTFT samples kept for the median."""
    _ttft_ms: list[float] = field(default_factory=list)

    def record_ttft(self, seconds: float) -> None:
        """One request's time to first token."""
        self._ttft_ms.append(seconds * 1000.0)
        if len(self._ttft_ms) > self.window:
            del self._ttft_ms[: len(self._ttft_ms) - self.window]

    def ttft_ms_p50(self) -> float:
        """Median of the recent window (0 when none)."""
        if not self._ttft_ms:
            return 0.0
        ordered = sorted(self._ttft_ms)
        return ordered[len(ordered) // 2]


class HeartbeatPublisher:
    """Issues the node's signed heartbeat: a fresh one at most every ``interval_s``, served from memory between."""

    def __init__(
        self,
        *,
        account: object,
        model_id: str,
        stats: Callable[[], EngineStats],
        builder: CacheSummaryBuilder | None = None,
        state: HeartbeatState | None = None,
        interval_s: float = 0.5,
        prefix_hashes: Callable[[str], Sequence[bytes]] | None = None,
        max_pending: int = 8,
    ) -> None:
        self._account = account
        self.operator = str(account.address)  # type: ignore[attr-defined]
        self.model_id = model_id.lower()
        self._stats = stats
        self.builder = builder or CacheSummaryBuilder()
        self.state = state or HeartbeatState()
        self.interval_s = interval_s
        self._seq = 0
        self._current: SignedHeartbeat | None = None
        self._issued_at = 0.0
        self._prefix_hashes = prefix_hashes
        self._pending: set[asyncio.Future[Sequence[bytes]]] = set()
        self._max_pending = max_pending

    # RequestObserver (node.overlay._completion): what the node's request handling tells the publisher.
    def started(self, prompt: str) -> None:
        """Count the prompt's prefix chunks (tokenized in a worker thread; skipped when ``max_pending`` are queued:
        the counts are a threshold, not an audit)."""
        if self._prefix_hashes is None or len(self._pending) >= self._max_pending:
            return
        future = asyncio.get_running_loop().run_in_executor(None, self._prefix_hashes, prompt)
        self._pending.add(future)
        future.add_done_callback(self._observed)

    def _observed(self, future: asyncio.Future[Sequence[bytes]]) -> None:
        self._pending.discard(future)
        if not future.cancelled() and future.exception() is None:
            self.builder.observe(future.result())

    def first_token(self, seconds: float) -> None:
        self.state.record_ttft(seconds)

    def finished(
        self, *, prompt_tokens: int, completion_tokens: int, cached_tokens: int, finish_reason: str, seconds: float
    ) -> None:
        return None

    def current(self, *, now: float | None = None) -> SignedHeartbeat:
        """The latest heartbeat, re-issued when older than ``interval_s``."""
        now = time.time() if now is None else now
        if self._current is None or now - self._issued_at >= self.interval_s:
            stats = self._stats()
            self._seq += 1
            heartbeat = Heartbeat(
                node=self.operator,
                model=self.model_id,
                seq=self._seq,
                issued_at_ms=int(now * 1000),
                queued_requests=stats.queued_requests,
                running_requests=stats.running_requests,
                queued_tokens=stats.queued_tokens,
                ttft_ms_p50=self.state.ttft_ms_p50(),
                summary=self.builder.build(stats.cached_prefix_hashes, now=now),
                decode_backlog_tokens=stats.decode_backlog_tokens,
                decode_ms_per_token=stats.seconds_per_decode_token * 1000.0,
                prefill_ms_per_token=stats.seconds_per_prefill_token * 1000.0,
            )
            self._current = sign_heartbeat(heartbeat, self._account)
            self._issued_at = now
        return self._current


def heartbeat_route(publisher: HeartbeatPublisher) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The ``GET /overlay/v1/heartbeat`` handler serving ``publisher``'s latest signed heartbeat."""

    async def handle(_request: web.Request) -> web.Response:
        return web.Response(body=publisher.current().model_dump_json().encode(), content_type="application/json")

    return handle
