"""The registry as the indexer sees it: ``NodeRegistry`` events folded into SQL tables (SQLModel).

The deployment's ``Attestations`` events (when it has that contract) are read in the same batches, keyed the same
way: a node's row carries its reputation, failure streak and penalty count, and each attestation is kept.

Design (see ``docs/chain.md``): the indexer reads only events. Each log is applied at most once, keyed by
(registry, block number, log index) in ``ledger_events``; a batch of blocks is applied in one database transaction
together with the cursor (last indexed block and its hash), so stopping at any point loses nothing and repeats
nothing.

Reorgs. Logs and block hashes come from separate RPC calls, so the chain can change between them. Each batch
therefore reads the end block's hash before and after ``eth_getLogs``, checks every log's ``blockHash`` against the
hash of its block, and checks that the cursor's block is still on the chain; any mismatch means the batch is thrown
away and fetched again. Only blocks ``confirmations`` below the head are indexed. The hashes of recent blocks (every
block with a log, each batch's end, and a few log-spaced checkpoints below it) are kept in ``ledger_blocks``; when
the cursor's block has left the chain, the newest kept block that is still on it is the common ancestor, and the
effects of every event above it are undone from the undo record stored with the event (the node row as it was
before). Only when no kept block survives (a fresh anvil under an old index, a reorg deeper than the window) is the
registry's index dropped and rebuilt from the deploy block.

Failures. A transport error is retried with bounded exponential backoff and then raised as
:class:`IndexerUnavailable`; it never changes the index. Writers take a lock (``BEGIN IMMEDIATE`` on SQLite, a
transaction-scoped advisory lock on PostgreSQL) and re-read the cursor under it, so two processes syncing one index
at once both finish: the later one finds the work done and moves on.

Amounts in wei use :class:`~ledger._amount.WeiAmount` (``NUMERIC(78,0)`` on PostgreSQL, order-preserving strings on
SQLite).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import requests
from sqlalchemy import Engine, and_, column, delete, event, func, inspect, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.pool import StaticPool
from sqlmodel import Field, Session, SQLModel, col, create_engine, select
from web3.exceptions import BlockNotFound, LogTopicError, MismatchedABI, ProviderConnectionError, Web3RPCError
from web3.types import EventData, FilterParams, LogReceipt

from ledger._amount import WeiAmount, sum_wei
from ledger._artifacts import load_artifact
from ledger._attestations import NEUTRAL_REPUTATION
from ledger._deploy import Deployment
from ledger._errors import ChainError, ChainUnavailable, InvalidChainInput
from ledger._registry import NodeRegistry
from ledger._types import Role, Wei, checksum
from planetserve import ModelId

#: Blocks per ``eth_getLogs`` request and per database transaction (bounds memory and RPC response size).
DEFAULT_BATCH_BLOCKS = 2_000
#: Blocks below the head left unindexed on a public chain (a reorg that deep is rare; deeper ones are rolled back).
DEFAULT_CONFIRMATIONS = 2
#: Local development chains (anvil, hardhat) mine on demand and reorganise only when told to: index to the head.
LOCAL_CHAIN_IDS = frozenset({31337})
#: Kept block hashes reach this many blocks below the cursor; a deeper reorg rebuilds the index.
REORG_WINDOW = 1_024
#: Checkpoints per batch at end-1, end-2, end-4 ... end-2**(n-1), so a short reorg finds a near ancestor.
CHECKPOINTS = 8
#: A sync gives up after this many batches thrown away because the chain changed under them.
MAX_REORG_RETRIES = 8
#: Retries of one RPC call after a transport error, and the first delay (doubling, capped at MAX_BACKOFF_S).
DEFAULT_RETRIES = 4
DEFAULT_BACKOFF_S = 0.25
MAX_BACKOFF_S = 4.0
#: Seconds a writer waits for another process's write lock before failing.
LOCK_TIMEOUT_S = 30.0
#: Bumped when a table's columns or an encoding change: an older index is dropped and rebuilt from the chain.
SCHEMA_VERSION = 3

_T = TypeVar("_T")
#: One advisory lock for every indexer writing to a PostgreSQL database (schema creation included); writes are short.
_PG_LOCK_ID = int.from_bytes(hashlib.sha256(b"planetserve-indexer").digest()[:8], "big", signed=True)
#: What a flaky RPC endpoint raises: connection refused/reset, timeouts, HTTP 429/5xx, JSON-RPC errors.
_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    requests.RequestException,
    OSError,
    ProviderConnectionError,
    Web3RPCError,
)


class IndexerError(ChainError):
    """A log could not be decoded strictly, or the index is inconsistent with the chain."""

    code = "chain_indexer_error"


class IndexerUnavailable(ChainUnavailable):
    """The chain could not be read after every retry; the index keeps every batch committed before."""

    code = "chain_unavailable_indexer"

    def __init__(self, *, method: str, attempts: int, detail: str) -> None:
        self.method = method
        self.attempts = attempts
        super().__init__(f"indexer: {method} failed {attempts} times ({detail}); the index is unchanged, sync again")


class DatabaseDriverMissing(ChainError):
    """The index database URL needs a driver that is not installed (``extra`` names the package extra)."""

    code = "invalid_database_driver"

    def __init__(self, *, dialect: str, extra: str) -> None:
        self.dialect = dialect
        self.extra = extra
        super().__init__(f"a {dialect} index needs its driver: pip install 'planetserve[{extra}]'")


class NodeRow(SQLModel, table=True):
    """Current state of one operator's node."""

    __tablename__ = "ledger_nodes"
    source: str = Field(primary_key=True)
    operator: str = Field(primary_key=True)
    role: int
    endpoint: str
    x25519_public_key: str
    model_id: str
    price_per_1k_tokens: int = Field(sa_type=WeiAmount)
    stake: int = Field(sa_type=WeiAmount)
    status: str = Field(index=True)
    unbonding_ends_at: int = 0
    jailed: bool = False
    registered_block: int
    updated_block: int
    #: Reputation from the attestation contract, fixed-point (1e6 = 1.0); neutral until first rated.
    reputation: int = NEUTRAL_REPUTATION
    #: Failing epochs in a row up to the latest verdict.
    failure_streak: int = 0
    #: Epochs the attestation contract penalized the node for.
    penalties: int = 0


class StakeChangeRow(SQLModel, table=True):
    """One change of an operator's bonded stake (register, add, slash, deregister)."""

    __tablename__ = "ledger_stake_changes"
    source: str = Field(primary_key=True)
    block_number: int = Field(primary_key=True)
    log_index: int = Field(primary_key=True)
    operator: str = Field(index=True)
    kind: str
    delta: int = Field(sa_type=WeiAmount(signed=True))
    new_stake: int = Field(sa_type=WeiAmount)


class UnbondingRow(SQLModel, table=True):
    """One unbonding request."""

    __tablename__ = "ledger_unbondings"
    source: str = Field(primary_key=True)
    block_number: int = Field(primary_key=True)
    log_index: int = Field(primary_key=True)
    operator: str = Field(index=True)
    stake: int = Field(sa_type=WeiAmount)
    unbonding_ends_at: int


class SlashRow(SQLModel, table=True):
    """One slash."""

    __tablename__ = "ledger_slashes"
    source: str = Field(primary_key=True)
    block_number: int = Field(primary_key=True)
    log_index: int = Field(primary_key=True)
    operator: str = Field(index=True)
    slasher: str
    amount: int = Field(sa_type=WeiAmount)
    remaining_stake: int = Field(sa_type=WeiAmount)
    evidence_hash: str


class AttestationRow(SQLModel, table=True):
    """One verifier's attestation of a model node for an epoch."""

    __tablename__ = "ledger_attestations"
    source: str = Field(primary_key=True)
    block_number: int = Field(primary_key=True)
    log_index: int = Field(primary_key=True)
    node: str = Field(index=True)
    verifier: str
    epoch: int
    score: int
    evidence_hash: str


class EventRow(SQLModel, table=True):
    """Every applied log: the idempotency key, an audit trail, and what undoing it restores."""

    __tablename__ = "ledger_events"
    source: str = Field(primary_key=True)
    block_number: int = Field(primary_key=True)
    log_index: int = Field(primary_key=True)
    block_hash: str
    tx_hash: str
    name: str
    #: The operator whose node row the event changed (None: it changed no node row).
    operator: str | None = None
    #: That node row before the event, as JSON (None: there was none). Undoing the event restores it.
    prior_node: str | None = None


class BlockRow(SQLModel, table=True):
    """A block hash the index relies on (blocks with logs, batch ends, checkpoints); finds the common ancestor."""

    __tablename__ = "ledger_blocks"
    source: str = Field(primary_key=True)
    block_number: int = Field(primary_key=True)
    block_hash: str


class CursorRow(SQLModel, table=True):
    """How far a registry is indexed, and the hash that block had (to detect resets and reorgs)."""

    __tablename__ = "ledger_cursor"
    source: str = Field(primary_key=True)
    chain_id: int
    deploy_block: int
    last_block: int
    last_block_hash: str


class SchemaRow(SQLModel, table=True):
    """The layout version of the indexer's tables (an older layout is dropped and rebuilt)."""

    __tablename__ = "ledger_schema"
    name: str = Field(primary_key=True)
    version: int


#: Tables holding one registry's data (all keyed by ``source``); details share the event's key.
_DATA_TABLES: list[type[SQLModel]] = [
    NodeRow,
    StakeChangeRow,
    UnbondingRow,
    SlashRow,
    AttestationRow,
    EventRow,
    BlockRow,
    CursorRow,
]
_DETAIL_TABLES: list[type[SQLModel]] = [StakeChangeRow, UnbondingRow, SlashRow, AttestationRow]
_ALL_TABLES: list[type[SQLModel]] = [*_DATA_TABLES, SchemaRow]


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncReport:
    """What one ``sync`` did."""

    #: First block examined (inclusive); greater than ``to_block`` when there was nothing new.
    from_block: int
    #: Last block indexed (inclusive): the head minus the confirmation depth, or the ``to_block`` asked for.
    to_block: int
    #: Logs applied now.
    applied: int
    #: Logs skipped because they were applied before.
    skipped: int
    #: Whether the stored index was dropped because no block it relied on is still on the chain.
    reset: bool
    #: Events undone because their blocks left the chain (a reorg rolled back to the common ancestor).
    rolled_back: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class IndexedNode:
    """A node as the index reports it (amounts in wei)."""

    #: Operator address (checksummed).
    operator: str
    #: Role.
    role: Role
    #: Public URL.
    endpoint: str
    #: Raw X25519 public key (32 bytes).
    x25519_public_key: bytes
    #: Model id (:attr:`ModelId.ZERO` for relays).
    model_id: ModelId
    #: Price in wei per 1000 tokens.
    price_per_1k_tokens: Wei
    #: Bonded stake in wei.
    stake: Wei
    #: ``active``, ``unbonding`` or ``deregistered``.
    status: str
    #: Whether the node is routable: active status, not jailed, and stake at least the role's minimum.
    active: bool
    #: Unix time the unbonding ends (0 while bonded).
    unbonding_ends_at: int
    #: Jailed by a slash (not routable) until its operator's ``unjail``.
    jailed: bool = False
    #: Reputation from the attestation contract, fixed-point (1e6 = 1.0; 500000 = neutral, never rated).
    reputation: int = NEUTRAL_REPUTATION
    #: Failing epochs in a row up to the latest verdict.
    failure_streak: int = 0
    #: Epochs the attestation contract penalized (slashed) the node for.
    penalties: int = 0


@dataclass(slots=True)
class _Batch:
    """Logs of blocks ``start..end`` and the block hashes they were checked against (one consistent chain)."""

    start: int
    end: int
    logs: list[LogReceipt]
    hashes: dict[int, str]


class _ChainMoved(Exception):
    """The chain changed while a batch was read: throw the batch away and read again."""


class _CursorMoved(Exception):
    """Another process changed the cursor since this one read it: re-read and go on from there."""


def _open_engine(db_url: str) -> tuple[Engine, Engine]:
    """A read engine and a write engine whose transactions take the database's write lock at BEGIN (SQLite)."""
    try:
        url: URL = make_url(db_url)
    except ArgumentError as exc:
        raise InvalidChainInput("db_url", "<unparsable URL>", "not an SQLAlchemy database URL") from exc
    if url.drivername == "postgresql":  # our declared driver is psycopg 3; SQLAlchemy's default is psycopg2
        url = url.set(drivername="postgresql+psycopg")
    shown = url.render_as_string(hide_password=True)
    sqlite = url.get_backend_name() == "sqlite"
    kwargs: dict[str, Any] = {"connect_args": {"timeout": LOCK_TIMEOUT_S}} if sqlite else {}
    memory = sqlite and url.database in (None, "", ":memory:")
    if memory:  # one connection shared by reads and writes, or each would see its own empty database
        kwargs["poolclass"] = StaticPool
    try:
        read = create_engine(url, **kwargs)
        write = create_engine(url, **kwargs) if sqlite and not memory else read
    except ImportError as exc:
        extra = "postgres" if url.get_backend_name() == "postgresql" else url.get_backend_name()
        raise DatabaseDriverMissing(dialect=url.get_backend_name(), extra=extra) from exc
    except NoSuchModuleError as exc:
        raise InvalidChainInput("db_url", shown, "unknown database dialect or driver") from exc
    if sqlite:

        @event.listens_for(write, "connect")
        def _no_implicit_begin(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # we issue BEGIN ourselves (SQLAlchemy's pysqlite recipe)

        @event.listens_for(write, "begin")
        def _begin_immediate(connection: Any) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    return read, write


class Indexer:
    """Folds one deployment's registry events into a SQL database (default SQLite, any SQLAlchemy URL).

    ``confirmations``: blocks below the head left unindexed (default 0 on local dev chains, else
    :data:`DEFAULT_CONFIRMATIONS`). ``retries``/``backoff_s``: how a transport error is retried before
    :class:`IndexerUnavailable`.
    """

    def __init__(
        self,
        registry: NodeRegistry,
        deployment: Deployment,
        db_url: str,
        *,
        confirmations: int | None = None,
        retries: int = DEFAULT_RETRIES,
        backoff_s: float = DEFAULT_BACKOFF_S,
    ) -> None:
        if confirmations is None:
            confirmations = 0 if deployment.chain_id in LOCAL_CHAIN_IDS else DEFAULT_CONFIRMATIONS
        if confirmations < 0:
            raise InvalidChainInput("confirmations", confirmations, "must be >= 0")
        if retries < 0 or backoff_s < 0:
            raise InvalidChainInput("retries", retries, "retries and backoff must be >= 0")
        self._registry = registry
        self._deployment = deployment
        self._confirmations = confirmations
        self._retries = retries
        self._backoff_s = backoff_s
        self._key: str = registry.address
        self._engine, self._write_engine = _open_engine(db_url)
        self._postgres = self._engine.dialect.name == "postgresql"
        self._ensure_schema()
        self._minimums = {
            Role.MODEL: int(deployment.params.get("minimumStakeModel", 0)),
            Role.RELAY: int(deployment.params.get("minimumStakeRelay", 0)),
            Role.VERIFIER: int(deployment.params.get("minimumStakeVerifier", 0)),
        }
        #: Contracts whose logs are read, and their decoders by (address, topic): strict per contract.
        self._addresses: list[str] = [registry.address]
        self._decoders: dict[tuple[str, bytes], tuple[str, Callable[[LogReceipt], EventData]]] = {}
        sources = [("NodeRegistry", registry.address)]
        if deployment.attestations_address is not None:
            sources.append(("Attestations", deployment.attestations_address))
            self._addresses.append(deployment.attestations_address)
        for contract_name, address in sources:
            abi = list(load_artifact(contract_name).abi)
            contract = registry.w3.eth.contract(address=checksum(address), abi=abi)
            for item in abi:
                if item.get("type") == "event":
                    name = str(item["name"])
                    signature = f"{name}({','.join(str(p['type']) for p in item['inputs'])})"
                    topic = bytes(registry.w3.keccak(text=signature))
                    self._decoders[(checksum(address), topic)] = (name, contract.events[name]().process_log)

    def close(self) -> None:
        """Release database connections."""
        self._engine.dispose()
        self._write_engine.dispose()

    def __enter__(self) -> Indexer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def confirmations(self) -> int:
        """Blocks below the head this indexer leaves unindexed."""
        return self._confirmations

    # -- database ----------------------------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[Session]:
        """One write transaction holding the index's write lock (waits at most :data:`LOCK_TIMEOUT_S`)."""
        with Session(self._write_engine) as session:
            if self._postgres:
                session.execute(text(f"SET LOCAL lock_timeout = '{int(LOCK_TIMEOUT_S * 1000)}ms'"))
                session.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _PG_LOCK_ID})
            yield session
            session.commit()

    def _ensure_schema(self) -> None:
        """Create the tables; drop an index written with an older layout (it is rebuilt from the chain)."""
        with self._write() as session:
            connection = session.connection()
            existing = set(inspect(connection).get_table_names())
            if existing & {t.__tablename__ for t in _DATA_TABLES}:
                version = None
                if SchemaRow.__tablename__ in existing:
                    row = session.get(SchemaRow, "indexer")
                    version = None if row is None else row.version
                if version != SCHEMA_VERSION:
                    SQLModel.metadata.drop_all(connection, tables=[t.__table__ for t in _ALL_TABLES])  # type: ignore[attr-defined]
                    session.expunge_all()
            SQLModel.metadata.create_all(connection, tables=[t.__table__ for t in _ALL_TABLES])  # type: ignore[attr-defined]
            if session.get(SchemaRow, "indexer") is None:
                session.add(SchemaRow(name="indexer", version=SCHEMA_VERSION))

    # -- chain reads -------------------------------------------------------------------------------------------

    def _rpc(self, method: str, call: Callable[[], _T]) -> _T:
        """``call()``, retried with exponential backoff on transport errors; then :class:`IndexerUnavailable`."""
        delay = self._backoff_s
        attempts = self._retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return call()
            except BlockNotFound:
                raise
            except _TRANSPORT_ERRORS as exc:
                if attempt == attempts:
                    raise IndexerUnavailable(method=method, attempts=attempts, detail=type(exc).__name__) from exc
                time.sleep(min(delay, MAX_BACKOFF_S))
                delay *= 2
        raise AssertionError("unreachable")  # pragma: no cover

    def _block_hash(self, number: int) -> str | None:
        """The chain's hash of block ``number`` now, or None when the chain is shorter."""
        try:
            block = self._rpc("eth_getBlockByNumber", lambda: self._registry.w3.eth.get_block(number))
        except BlockNotFound:
            return None
        block_hash = block.get("hash")
        return None if block_hash is None else block_hash.to_0x_hex()

    def _fetch(self, start: int, end: int, cursor: CursorRow | None) -> _Batch:
        """Logs of ``start..end``, all checked to come from the chain whose hashes are recorded with them."""
        end_hash = self._block_hash(end)
        if end_hash is None:
            raise _ChainMoved
        w3 = self._registry.w3
        addresses: Any = self._addresses if len(self._addresses) > 1 else self._addresses[0]
        query = FilterParams(address=addresses, fromBlock=start, toBlock=end)
        logs = list(self._rpc("eth_getLogs", lambda: w3.eth.get_logs(query)))
        hashes = {end: end_hash}
        for step in range(CHECKPOINTS):
            if end - 2**step >= start:
                hashes.setdefault(end - 2**step, "")
        for log in logs:
            hashes.setdefault(int(log["blockNumber"]), "")
        for number in sorted(hashes):
            if not hashes[number]:
                found = self._block_hash(number)
                if found is None:
                    raise _ChainMoved
                hashes[number] = found
        for log in logs:
            if log["blockHash"].to_0x_hex() != hashes[int(log["blockNumber"])]:
                raise _ChainMoved
        if cursor is not None and self._block_hash(cursor.last_block) != cursor.last_block_hash:
            raise _ChainMoved
        if self._block_hash(end) != end_hash:  # last: any reorg reaching <= end since the first read shows here
            raise _ChainMoved
        return _Batch(start=start, end=end, logs=logs, hashes=hashes)

    # -- syncing -----------------------------------------------------------------------------------------------

    def sync(self, *, to_block: int | None = None, batch_blocks: int = DEFAULT_BATCH_BLOCKS) -> SyncReport:
        """Index from the cursor up to ``to_block`` (default: the head minus the confirmation depth).

        One transaction per batch. Raises :class:`IndexerUnavailable` when the chain cannot be read (the index keeps
        what was committed), :class:`IndexerError` when the chain keeps changing under every try.
        """
        if batch_blocks < 1:
            raise ValueError("batch_blocks must be >= 1")
        target = self._target(to_block)
        applied = skipped = rolled_back = 0
        reset = False
        first: int | None = None
        moved = 0
        while True:
            was_reset, undone = self._reconcile()
            reset, rolled_back = reset or was_reset, rolled_back + undone
            cursor = self._cursor()
            start = self._deployment.deploy_block if cursor is None else cursor.last_block + 1
            first = start if first is None else min(first, start)
            if start > target:
                break
            end = min(start + batch_blocks - 1, target)
            try:
                batch = self._fetch(start, end, cursor)
                new, old = self._commit(batch, cursor)
            except (_ChainMoved, _CursorMoved) as exc:
                if isinstance(exc, _ChainMoved):
                    moved += 1
                    if moved > MAX_REORG_RETRIES:
                        raise IndexerError(f"the chain changed under {moved} reads of blocks {start}..{end}") from None
                    target = self._target(to_block)  # the new chain may be shorter
                continue
            applied, skipped = applied + new, skipped + old
        return SyncReport(
            from_block=first, to_block=target, applied=applied, skipped=skipped, reset=reset, rolled_back=rolled_back
        )

    def _target(self, to_block: int | None) -> int:
        safe = self._rpc("eth_blockNumber", lambda: self._registry.w3.eth.block_number) - self._confirmations
        return safe if to_block is None else min(to_block, safe)

    def _cursor(self) -> CursorRow | None:
        with Session(self._engine) as session:
            return session.get(CursorRow, self._key)

    @staticmethod
    def _same_cursor(a: CursorRow | None, b: CursorRow | None) -> bool:
        if a is None or b is None:
            return a is b
        return (a.last_block, a.last_block_hash) == (b.last_block, b.last_block_hash)

    def _commit(self, batch: _Batch, seen: CursorRow | None) -> tuple[int, int]:
        """Apply a checked batch and move the cursor, unless another process moved it first."""
        applied = skipped = 0
        with self._write() as session:
            if not self._same_cursor(session.get(CursorRow, self._key), seen):
                raise _CursorMoved
            for log in sorted(batch.logs, key=lambda lg: (lg["blockNumber"], lg["logIndex"])):
                if self._apply(session, log):
                    applied += 1
                else:
                    skipped += 1
            for number, block_hash in batch.hashes.items():
                session.merge(BlockRow(source=self._key, block_number=number, block_hash=block_hash))
            session.execute(
                delete(BlockRow).where(
                    col(BlockRow.source) == self._key, col(BlockRow.block_number) < batch.end - REORG_WINDOW
                )
            )
            self._save_cursor(session, batch.end, batch.hashes[batch.end])
        return applied, skipped

    def _save_cursor(self, session: Session, block: int, block_hash: str) -> None:
        row = session.get(CursorRow, self._key)
        if row is None:
            row = CursorRow(
                source=self._key,
                chain_id=self._deployment.chain_id,
                deploy_block=self._deployment.deploy_block,
                last_block=block,
                last_block_hash=block_hash,
            )
        else:
            row.last_block = block
            row.last_block_hash = block_hash
        session.add(row)

    def _reconcile(self) -> tuple[bool, int]:
        """Make the stored index a prefix of the chain: ``(wiped, events undone)``; transport errors propagate."""
        for _ in range(MAX_REORG_RETRIES):
            cursor = self._cursor()
            if cursor is None:
                return False, 0
            same_deployment = (cursor.chain_id, cursor.deploy_block) == (
                self._deployment.chain_id,
                self._deployment.deploy_block,
            )
            if same_deployment and self._block_hash(cursor.last_block) == cursor.last_block_hash:
                return False, 0
            ancestor: BlockRow | None = None
            if same_deployment:
                with Session(self._engine) as session:
                    query = (
                        select(BlockRow)
                        .where(col(BlockRow.source) == self._key, col(BlockRow.block_number) < cursor.last_block)
                        .order_by(col(BlockRow.block_number).desc())
                    )
                    kept = list(session.exec(query).all())
                for row in kept:
                    if self._block_hash(row.block_number) == row.block_hash:
                        ancestor = row
                        break
            try:
                return self._roll_back(cursor, ancestor)
            except _CursorMoved:
                continue  # another process rolled back (and maybe synced) first: look again
        raise IndexerError("the index's cursor keeps moving while reconciling with the chain")

    def _roll_back(self, seen: CursorRow, ancestor: BlockRow | None) -> tuple[bool, int]:
        """Undo every event above ``ancestor`` (None: drop this registry's whole index)."""
        with self._write() as session:
            if not self._same_cursor(session.get(CursorRow, self._key), seen):
                raise _CursorMoved
            if ancestor is None:
                count = session.exec(
                    select(func.count()).select_from(EventRow).where(col(EventRow.source) == self._key)
                ).one()
                for table in _DATA_TABLES:
                    session.execute(delete(table).where(column("source") == self._key))
                return True, int(count)
            query = (
                select(EventRow)
                .where(col(EventRow.source) == self._key, col(EventRow.block_number) > ancestor.block_number)
                .order_by(col(EventRow.block_number).desc(), col(EventRow.log_index).desc())
            )
            orphans = list(session.exec(query).all())
            for orphan in orphans:
                self._undo(session, orphan)
            session.execute(
                delete(BlockRow).where(
                    col(BlockRow.source) == self._key, col(BlockRow.block_number) > ancestor.block_number
                )
            )
            self._save_cursor(session, ancestor.block_number, ancestor.block_hash)
            return False, len(orphans)

    def _undo(self, session: Session, row: EventRow) -> None:
        """Reverse one event: restore the node row it changed, delete the detail rows it wrote and itself."""
        if row.operator is not None:
            current = session.get(NodeRow, (self._key, row.operator))
            if row.prior_node is None:
                if current is not None:
                    session.delete(current)
            else:
                prior = json.loads(row.prior_node)
                restored = NodeRow(
                    **{k: v for k, v in prior.items() if k not in ("stake", "price_per_1k_tokens")},
                    stake=int(prior["stake"]),
                    price_per_1k_tokens=int(prior["price_per_1k_tokens"]),
                )
                session.merge(restored)
        key = (self._key, row.block_number, row.log_index)
        for table in _DETAIL_TABLES:
            detail = session.get(table, key)
            if detail is not None:
                session.delete(detail)
        session.delete(row)
        session.flush()

    # -- applying events ---------------------------------------------------------------------------------------

    def _decode(self, log: LogReceipt) -> tuple[str, dict[str, Any]]:
        topics = log["topics"]
        key = (checksum(log["address"]), bytes(topics[0]) if topics else b"")
        if key not in self._decoders:
            raise IndexerError(f"unknown event topic in log {log['blockNumber']}:{log['logIndex']}")
        name, process = self._decoders[key]
        try:
            event = process(log)
        except (MismatchedABI, LogTopicError, ValueError) as exc:
            raise IndexerError(f"cannot decode {name} at {log['blockNumber']}:{log['logIndex']}") from exc
        return name, dict(event["args"])

    @staticmethod
    def _node_json(row: NodeRow | None) -> str | None:
        if row is None:
            return None
        data = row.model_dump()
        data["stake"], data["price_per_1k_tokens"] = str(row.stake), str(row.price_per_1k_tokens)
        return json.dumps(data, sort_keys=True)

    def _apply(self, session: Session, log: LogReceipt) -> bool:
        block, index = int(log["blockNumber"]), int(log["logIndex"])
        block_hash = log["blockHash"].to_0x_hex()
        stored = session.get(EventRow, (self._key, block, index))
        if stored is not None:
            if stored.block_hash != block_hash:
                raise IndexerError(f"stored event {block}:{index} is from block {stored.block_hash}, not on the chain")
            return False
        name, args = self._decode(log)
        handler = getattr(self, f"_on_{name}", None)
        subject = "operator" if "operator" in args else "node"  # registry events name it operator, attestations node
        operator = checksum(args[subject]) if handler is not None and subject in args else None
        prior = None if operator is None else self._node_json(session.get(NodeRow, (self._key, operator)))
        session.add(
            EventRow(
                source=self._key,
                block_number=block,
                log_index=index,
                block_hash=block_hash,
                tx_hash=log["transactionHash"].to_0x_hex(),
                name=name,
                operator=operator,
                prior_node=prior,
            )
        )
        if handler is not None:
            handler(session, block, index, args)
        return True

    def _node(self, session: Session, operator: str) -> NodeRow:
        row = session.get(NodeRow, (self._key, checksum(operator)))
        if row is None:
            raise IndexerError(f"event for operator {operator} before its NodeRegistered")
        return row

    def _stake_change(
        self, session: Session, block: int, index: int, operator: str, kind: str, delta: int, new: int
    ) -> None:
        session.add(
            StakeChangeRow(
                source=self._key,
                block_number=block,
                log_index=index,
                operator=checksum(operator),
                kind=kind,
                delta=delta,
                new_stake=new,
            )
        )

    def _on_NodeRegistered(self, session: Session, block: int, index: int, a: dict[str, Any]) -> None:
        operator = checksum(a["operator"])
        session.merge(
            NodeRow(
                source=self._key,
                operator=operator,
                role=int(a["role"]),
                endpoint=str(a["endpoint"]),
                x25519_public_key=bytes(a["x25519PublicKey"]).hex(),
                model_id=bytes(a["modelId"]).hex(),
                price_per_1k_tokens=int(a["pricePer1kTokens"]),
                stake=int(a["stake"]),
                status="active",
                unbonding_ends_at=0,
                registered_block=block,
                updated_block=block,
            )
        )
        self._stake_change(session, block, index, operator, "register", int(a["stake"]), int(a["stake"]))

    def _on_StakeAdded(self, session: Session, block: int, index: int, a: dict[str, Any]) -> None:
        row = self._node(session, a["operator"])
        row.stake, row.updated_block = int(a["newStake"]), block
        session.add(row)
        self._stake_change(session, block, index, a["operator"], "add", int(a["amount"]), int(a["newStake"]))

    def _on_NodeUpdated(self, session: Session, block: int, index: int, a: dict[str, Any]) -> None:
        row = self._node(session, a["operator"])
        row.endpoint = str(a["endpoint"])
        row.x25519_public_key = bytes(a["x25519PublicKey"]).hex()
        row.price_per_1k_tokens = int(a["pricePer1kTokens"])
        row.updated_block = block
        session.add(row)

    def _on_UnbondingRequested(self, session: Session, block: int, index: int, a: dict[str, Any]) -> None:
        row = self._node(session, a["operator"])
        row.status, row.unbonding_ends_at, row.updated_block = "unbonding", int(a["unbondingEndsAt"]), block
        session.add(row)
        session.add(
            UnbondingRow(
                source=self._key,
                block_number=block,
                log_index=index,
                operator=checksum(a["operator"]),
                stake=int(a["stake"]),
                unbonding_ends_at=int(a["unbondingEndsAt"]),
            )
        )

    def _on_NodeDeregistered(self, session: Session, block: int, index: int, a: dict[str, Any]) -> None:
        row = self._node(session, a["operator"])
        row.status, row.stake, row.updated_block = "deregistered", 0, block
        session.add(row)
        released = int(a["releasedStake"])
        self._stake_change(session, block, index, a["operator"], "deregister", -released, 0)

    def _on_NodeSlashed(self, session: Session, block: int, index: int, a: dict[str, Any]) -> None:
        row = self._node(session, a["operator"])
        row.stake, row.updated_block = int(a["remainingStake"]), block
        session.add(row)
        amount, remaining = int(a["amount"]), int(a["remainingStake"])
        self._stake_change(session, block, index, a["operator"], "slash", -amount, remaining)
        session.add(
            SlashRow(
                source=self._key,
                block_number=block,
                log_index=index,
                operator=checksum(a["operator"]),
                slasher=checksum(a["slasher"]),
                amount=amount,
                remaining_stake=remaining,
                evidence_hash=bytes(a["evidenceHash"]).hex(),
            )
        )

    def _on_NodeJailed(self, session: Session, block: int, index: int, a: dict[str, Any]) -> None:
        row = self._node(session, a["operator"])
        row.jailed, row.updated_block = True, block
        session.add(row)

    def _on_NodeUnjailed(self, session: Session, block: int, index: int, a: dict[str, Any]) -> None:
        row = self._node(session, a["operator"])
        row.jailed, row.stake, row.updated_block = False, int(a["stake"]), block
        session.add(row)

    def _on_UnbondingCancelled(self, session: Session, block: int, index: int, a: dict[str, Any]) -> None:
        row = self._node(session, a["operator"])
        row.status, row.unbonding_ends_at, row.stake, row.updated_block = "active", 0, int(a["stake"]), block
        session.add(row)

    def _on_AttestationSubmitted(self, session: Session, block: int, index: int, a: dict[str, Any]) -> None:
        self._node(session, a["node"])  # attested nodes are registered model nodes: strict
        session.add(
            AttestationRow(
                source=self._key,
                block_number=block,
                log_index=index,
                node=checksum(a["node"]),
                verifier=checksum(a["verifier"]),
                epoch=int(a["epoch"]),
                score=int(a["score"]),
                evidence_hash=bytes(a["evidenceHash"]).hex(),
            )
        )

    def _on_ReputationUpdated(self, session: Session, block: int, index: int, a: dict[str, Any]) -> None:
        row = self._node(session, a["node"])
        row.reputation, row.failure_streak = int(a["newReputation"]), int(a["failureStreak"])
        row.updated_block = block
        session.add(row)

    def _on_NodePenalized(self, session: Session, block: int, index: int, a: dict[str, Any]) -> None:
        row = self._node(session, a["node"])
        row.penalties, row.updated_block = row.penalties + 1, block
        session.add(row)

    # -- queries -----------------------------------------------------------------------------------------------

    def nodes(self, *, include_deregistered: bool = False) -> list[IndexedNode]:
        """Every indexed node, ordered by role then operator."""
        with Session(self._engine) as session:
            query = select(NodeRow).where(col(NodeRow.source) == self._key)
            rows: Sequence[NodeRow] = session.exec(query).all()
        result = [self._to_node(r) for r in rows if include_deregistered or r.status != "deregistered"]
        return sorted(result, key=lambda n: (n.role, n.operator))

    def largest_stakes(self, limit: int, *, role: Role | None = None) -> list[IndexedNode]:
        """Up to ``limit`` bonded nodes with the largest stake (ties by operator), ordered in SQL."""
        with Session(self._engine) as session:
            query = select(NodeRow).where(col(NodeRow.source) == self._key, col(NodeRow.status) != "deregistered")
            if role is not None:
                query = query.where(col(NodeRow.role) == int(role))
            query = query.order_by(col(NodeRow.stake).desc(), col(NodeRow.operator)).limit(limit)
            return [self._to_node(r) for r in session.exec(query).all()]

    def total_stake(self, *, role: Role | None = None) -> Wei:
        """Exact sum of the bonded stake of every node that is not deregistered (optionally of one role)."""
        criteria = [col(NodeRow.source) == self._key, col(NodeRow.status) != "deregistered"]
        if role is not None:
            criteria.append(col(NodeRow.role) == int(role))
        with Session(self._engine) as session:
            return Wei(sum_wei(session, col(NodeRow.stake), and_(*criteria)))

    def stake_changes(self, operator: str) -> list[tuple[str, int, int]]:
        """``(kind, delta_wei, new_stake_wei)`` of ``operator`` in chain order."""
        with Session(self._engine) as session:
            query = select(StakeChangeRow).where(
                col(StakeChangeRow.source) == self._key, col(StakeChangeRow.operator) == checksum(operator)
            )
            rows = sorted(session.exec(query).all(), key=lambda r: (r.block_number, r.log_index))
        return [(r.kind, int(r.delta), int(r.new_stake)) for r in rows]

    def attestations(self, node: str) -> list[tuple[int, str, int, str]]:
        """``(epoch, verifier, score, evidence_hash_hex)`` of every attestation of ``node``, in chain order."""
        with Session(self._engine) as session:
            query = select(AttestationRow).where(
                col(AttestationRow.source) == self._key, col(AttestationRow.node) == checksum(node)
            )
            rows = sorted(session.exec(query).all(), key=lambda r: (r.block_number, r.log_index))
        return [(r.epoch, r.verifier, r.score, r.evidence_hash) for r in rows]

    def event_count(self) -> int:
        """How many logs have been applied."""
        with Session(self._engine) as session:
            query = select(func.count()).select_from(EventRow).where(col(EventRow.source) == self._key)
            return int(session.exec(query).one())

    def last_block(self) -> int | None:
        """The last indexed block, or None before the first sync."""
        cursor = self._cursor()
        return None if cursor is None else cursor.last_block

    def _to_node(self, row: NodeRow) -> IndexedNode:
        role = Role(row.role)
        stake = int(row.stake)
        return IndexedNode(
            operator=row.operator,
            role=role,
            endpoint=row.endpoint,
            x25519_public_key=bytes.fromhex(row.x25519_public_key),
            model_id=ModelId(bytes.fromhex(row.model_id)),  # stored as 64 hex digits (the schema's form)
            price_per_1k_tokens=Wei(int(row.price_per_1k_tokens)),
            stake=Wei(stake),
            status=row.status,
            active=row.status == "active" and not row.jailed and stake >= self._minimums[role],
            unbonding_ends_at=row.unbonding_ends_at,
            jailed=row.jailed,
            reputation=row.reputation,
            failure_streak=row.failure_streak,
            penalties=row.penalties,
        )
