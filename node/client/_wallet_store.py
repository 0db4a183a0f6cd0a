"""The client wallet's durable book: its payment channels, what it signed on each, and the locks that keep several
processes of one client from signing conflicting vouchers.

Why durable: a voucher is cumulative, and a model node refuses one below the latest it accepted (``voucher_stale``).
A client that forgot what it signed would sign too low after a restart and be refused; one that forgot a channel
would lose track of its deposit. So the amount of every voucher is committed here **before** the voucher is signed
and sent, and a pending deposit is recorded before its transaction leaves.

Why SQLite with ``BEGIN IMMEDIATE``: every read-modify-write of a channel's row runs in one transaction that takes
the database's write lock first, so two processes of the same client (``ps-client ask`` run twice at once) never
both compute the next voucher from the same old row. Vouchers must also *reach* the node in the order they were
signed, which a database cannot enforce across the network: :class:`ChannelLocks` holds one ``flock`` per node from
before signing until the node answered (the lock dies with its process, so a crash never leaves it held).

Rows are keyed by the chain's genesis block hash, the contract and the client address: a fresh anvil reuses chain id
31337 and often the same contract addresses, and its channel 1 is not the old chain's channel 1.

Amounts are decimal strings (SQLite integers are 64-bit; wei reach 2**256). One book per client state directory.

A channel found on chain by ``Wallet.recover`` after the book was lost is ``recovered``: what was signed on it is
unknown, so its ``last`` is set to its deposit (no voucher can be above that) and the book never signs on it again;
it is only closed and reclaimed. The column was added after the first books were written: opening an older book adds
it (every existing channel is not recovered).
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event
from sqlmodel import Field, Session, SQLModel, create_engine, select

#: Channel states, as the client sees them.
OPEN, CLOSING, SETTLED, GONE = "open", "closing", "settled", "gone"
#: Seconds a transaction waits for another process's write lock on the book.
BUSY_TIMEOUT_S = 10.0
#: Seconds between two tries of a node's admission lock held by another process.
LOCK_POLL_S = 0.02


class WalletChannelRow(SQLModel, table=True):
    """One channel of the client's: its on-chain facts as last seen, and the client's own book."""

    __tablename__ = "wallet_channels"

    genesis: str = Field(primary_key=True, max_length=66)
    contract: str = Field(primary_key=True, max_length=42)
    channel_id: str = Field(primary_key=True, max_length=78)
    client: str = Field(index=True, max_length=42)
    node: str = Field(max_length=42)
    #: The key that signs on it: "" for the client's own key, else the fresh-address derivation index.
    key_index: str = Field(default="", max_length=20)
    deposit: str = Field(max_length=78)
    #: The highest cumulative amount signed on it (decimal wei).
    last: str = Field(default="0", max_length=78)
    #: What finished requests cost by the client's count (decimal wei).
    owed: str = Field(default="0", max_length=78)
    #: Reservations of requests still streaming (decimal wei).
    in_flight: str = Field(default="0", max_length=78)
    #: Redeemed by the node, as last read from the chain (decimal wei).
    redeemed: str = Field(default="0", max_length=78)
    #: Unix time from which the node can no longer redeem; 0 while open.
    closes_at: int = 0
    state: str = Field(default=OPEN, max_length=8)
    updated_at: float = 0.0
    #: Found on chain after the book was lost: what was signed on it is unknown; never paid on again.
    recovered: bool = False


class PendingDeposit(SQLModel, table=True):
    """A deposit whose transaction may have left but whose outcome is not recorded yet."""

    __tablename__ = "wallet_pending_deposits"

    id: int | None = Field(default=None, primary_key=True)
    genesis: str = Field(max_length=66)
    contract: str = Field(max_length=42)
    client: str = Field(max_length=42)
    node: str = Field(max_length=42)
    key_index: str = Field(default="", max_length=20)
    amount: str = Field(max_length=78)
    #: The block before the transaction was sent: where to look for its ``ChannelOpened`` event.
    from_block: int
    created_at: float


@dataclass(slots=True, kw_only=True)
class ChannelState:
    """What the wallet knows of one of its channels (a copy; amounts in wei)."""

    channel_id: int
    """On-chain id."""
    node: str
    """The model node's operator address."""
    deposit: int
    """Wei deposited so far."""
    last: int = 0
    """The highest cumulative amount signed on it, wei."""
    owed: int = 0
    """What the client believes its finished requests cost, wei."""
    in_flight: int = 0
    """Reservations of requests still streaming, wei."""
    redeemed: int = 0
    """What the node redeemed, as last read from the chain, wei."""
    closes_at: int = 0
    """Unix time (chain clock) from which the node can no longer redeem; 0 while open."""
    state: str = OPEN
    """``open``, ``closing``, ``settled`` or ``gone`` (not on this chain any more)."""
    key_index: str = ""
    """"" when the client's own key signs; else the fresh-address derivation index."""
    recovered: bool = False
    """Rebuilt from the chain after the book was lost: ``last`` and ``owed`` are not known (``last`` is the deposit,
    ``owed`` what was redeemed); never paid on again, only closed."""

    @property
    def left(self) -> int:
        """Deposit not yet promised in a voucher, wei."""
        return max(0, self.deposit - self.last)


def _state(row: WalletChannelRow) -> ChannelState:
    return ChannelState(
        channel_id=int(row.channel_id),
        node=row.node,
        deposit=int(row.deposit),
        last=int(row.last),
        owed=int(row.owed),
        in_flight=int(row.in_flight),
        redeemed=int(row.redeemed),
        closes_at=row.closes_at,
        state=row.state,
        key_index=row.key_index,
        recovered=bool(row.recovered),
    )


def _immediate(engine: Engine) -> Engine:
    """Make every transaction on ``engine`` a SQLite ``BEGIN IMMEDIATE`` (SQLAlchemy's documented pysqlite recipe):
    the write lock is taken before the first read, so read-modify-write never interleaves across processes."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # the driver's own BEGIN is off; ours follows
        # WAL: a commit is one fsync of the log (the rollback journal needs several), and readers never wait for
        # the writer; synchronous FULL keeps every commit durable across a power loss, not only a crash.
        dbapi_connection.execute("PRAGMA journal_mode=WAL")
        dbapi_connection.execute("PRAGMA synchronous=FULL")

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        # Reads (execution option ``planetserve_read``) see one snapshot without the write lock.
        read = connection.get_execution_options().get("planetserve_read", False)
        connection.exec_driver_sql("BEGIN" if read else "BEGIN IMMEDIATE")

    return engine


class WalletStore:
    """The channels of ``client`` on one contract of one chain, in a SQLite file (or in memory)."""

    def __init__(self, path: Path, *, genesis: str, contract: str, client: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        engine = create_engine(
            f"sqlite:///{path}", connect_args={"timeout": BUSY_TIMEOUT_S, "check_same_thread": False}
        )
        self._engine = _immediate(engine)
        self._reader = self._engine.execution_options(planetserve_read=True)
        self.path = path
        self._key = (genesis.lower(), contract, client)
        SQLModel.metadata.create_all(
            self._engine,
            tables=[WalletChannelRow.__table__, PendingDeposit.__table__],  # type: ignore[attr-defined]
        )
        self._migrate()

    def _migrate(self) -> None:
        """Add the columns a book written by an older version lacks (``create_all`` adds tables, not columns)."""
        with self._engine.begin() as connection:
            columns = {row[1] for row in connection.exec_driver_sql("PRAGMA table_info(wallet_channels)")}
            if "recovered" not in columns:
                connection.exec_driver_sql(
                    "ALTER TABLE wallet_channels ADD COLUMN recovered BOOLEAN NOT NULL DEFAULT 0"
                )

    def __repr__(self) -> str:
        return f"WalletStore(path={self.path}, client={self._key[2]})"

    def close(self) -> None:
        """Release the database's connections."""
        self._engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        """A write transaction: the database's write lock is taken at its start."""
        with Session(self._engine, expire_on_commit=False) as session, session.begin():
            yield session

    @contextmanager
    def _read(self) -> Iterator[Session]:
        """A read-only transaction (one consistent snapshot; never waits for a writer under WAL)."""
        with Session(self._reader, expire_on_commit=False) as session, session.begin():
            yield session

    def _rows(self, session: Session) -> list[WalletChannelRow]:
        genesis, contract, client = self._key
        query = select(WalletChannelRow).where(
            WalletChannelRow.genesis == genesis,
            WalletChannelRow.contract == contract,
            WalletChannelRow.client == client,
        )
        return sorted(session.exec(query).all(), key=lambda r: int(r.channel_id))

    def _row(self, session: Session, channel_id: int) -> WalletChannelRow:
        genesis, contract, _client = self._key
        row = session.get(WalletChannelRow, (genesis, contract, str(channel_id)))
        if row is None:
            raise KeyError(channel_id)
        return row

    # -- reads -------------------------------------------------------------------------------------------------

    def channels(self, *, include_closed: bool = False) -> list[ChannelState]:
        """Every channel (open and closing; settled and gone ones too with ``include_closed``), by id."""
        with self._read() as session:
            rows = self._rows(session)
        return [_state(r) for r in rows if include_closed or r.state in (OPEN, CLOSING)]

    def active(self, node: str) -> ChannelState | None:
        """The open channel to ``node`` with the most deposit left, or None (never a recovered one)."""
        candidates = [c for c in self.channels() if c.node == node and c.state == OPEN and not c.recovered]
        return max(candidates, key=lambda c: (c.left, c.channel_id), default=None)

    def get(self, channel_id: int) -> ChannelState | None:
        """Channel ``channel_id`` of this client, or None."""
        with self._read() as session:
            try:
                return _state(self._row(session, channel_id))
            except KeyError:
                return None

    def committed_deposits(self) -> int:
        """Wei in open and closing channels plus pending deposits: what the budget is measured against."""
        with self._read() as session:
            return self._committed(session)

    def _committed(self, session: Session) -> int:
        held = sum(int(r.deposit) - int(r.redeemed) for r in self._rows(session) if r.state in (OPEN, CLOSING))
        return held + sum(int(p.amount) for p in self._pending(session))

    def _pending(self, session: Session) -> list[PendingDeposit]:
        genesis, contract, client = self._key
        query = select(PendingDeposit).where(
            PendingDeposit.genesis == genesis, PendingDeposit.contract == contract, PendingDeposit.client == client
        )
        return list(session.exec(query).all())

    def pending(self) -> list[PendingDeposit]:
        """Deposits sent (or about to be) whose channel is not recorded yet."""
        with self._read() as session:
            return self._pending(session)

    # -- writes ------------------------------------------------------------------------------------------------

    def reserve_deposit(
        self, node: str, amount: int, *, from_block: int, budget: int | None, key_index: str = ""
    ) -> int | None:
        """Record a deposit about to be sent (its id), checking ``budget`` against every committed deposit in the
        same transaction; None when it would exceed the budget (nothing recorded then)."""
        with self._tx() as session:
            if budget is not None and self._committed(session) + amount > budget:
                return None
            genesis, contract, client = self._key
            pending = PendingDeposit(
                genesis=genesis,
                contract=contract,
                client=client,
                node=node,
                key_index=key_index,
                amount=str(amount),
                from_block=from_block,
                created_at=time.time(),
            )
            session.add(pending)
            session.flush()
            assert pending.id is not None
            return pending.id

    def drop_pending(self, pending_id: int) -> None:
        """Forget a pending deposit (its transaction failed for sure, or its outcome was recorded)."""
        with self._tx() as session:
            row = session.get(PendingDeposit, pending_id)
            if row is not None:
                session.delete(row)

    def record_channel(
        self,
        *,
        channel_id: int,
        node: str,
        deposit: int,
        redeemed: int = 0,
        closes_at: int = 0,
        state: str = OPEN,
        key_index: str = "",
        pending_id: int | None = None,
        recovered: bool = False,
    ) -> ChannelState:
        """Add (or refresh the on-chain facts of) a channel, dropping ``pending_id`` in the same transaction.

        A new ``recovered`` channel starts with ``last`` at its deposit (the most any voucher on it can be) and
        ``owed`` at what was redeemed; an existing row keeps its book."""
        genesis, contract, client = self._key
        with self._tx() as session:
            row = session.get(WalletChannelRow, (genesis, contract, str(channel_id)))
            if row is None:
                row = WalletChannelRow(
                    genesis=genesis,
                    contract=contract,
                    channel_id=str(channel_id),
                    client=client,
                    node=node,
                    key_index=key_index,
                    deposit=str(deposit),
                    recovered=recovered,
                )
                if recovered:
                    row.last = str(deposit)
                    row.owed = str(redeemed)
            self._refresh(row, deposit=deposit, redeemed=redeemed, closes_at=closes_at, state=state)
            session.add(row)
            if pending_id is not None:
                pending = session.get(PendingDeposit, pending_id)
                if pending is not None:
                    session.delete(pending)
            return _state(row)

    @staticmethod
    def _refresh(row: WalletChannelRow, *, deposit: int, redeemed: int, closes_at: int, state: str) -> None:
        row.deposit = str(deposit)
        row.redeemed = str(redeemed)
        # A voucher must be above what was redeemed (the node refuses it otherwise): never sign at or below it.
        row.last = str(max(int(row.last), redeemed))
        if row.recovered:  # unknown what was signed: keep it at the most any voucher on it can be
            row.last = str(max(int(row.last), deposit))
        row.closes_at = closes_at
        row.state = state
        row.updated_at = time.time()

    def refresh(self, channel_id: int, *, deposit: int, redeemed: int, closes_at: int, state: str) -> None:
        """Update a known channel's on-chain facts."""
        with self._tx() as session:
            row = self._row(session, channel_id)
            self._refresh(row, deposit=deposit, redeemed=redeemed, closes_at=closes_at, state=state)
            session.add(row)

    def mark(self, channel_id: int, state: str) -> None:
        """Set a channel's state (``gone`` when the chain no longer has it as ours)."""
        with self._tx() as session:
            row = self._row(session, channel_id)
            row.state = state
            row.updated_at = time.time()
            session.add(row)

    def sign_amount(self, channel_id: int, reservation: int) -> int | None:
        """Commit the next voucher's amount on ``channel_id`` for a request reserving ``reservation`` wei:
        ``max(last + 1, owed + in_flight + reservation)`` (protocol §10.4), with the reservation added to
        ``in_flight``; None (nothing written) when it exceeds the deposit."""
        with self._tx() as session:
            row = self._row(session, channel_id)
            if row.recovered:  # what was signed on it is unknown: any new voucher could be below an old one
                raise ValueError(f"channel {channel_id} was recovered from the chain: it is never paid on again")
            amount = max(int(row.last) + 1, int(row.owed) + int(row.in_flight) + reservation)
            if amount > int(row.deposit):
                return None
            row.last = str(amount)
            row.in_flight = str(int(row.in_flight) + reservation)
            row.updated_at = time.time()
            session.add(row)
            return amount

    def next_amount(self, channel_id: int, reservation: int) -> int:
        """What :meth:`sign_amount` would commit now (to size a top-up)."""
        state = self.get(channel_id)
        if state is None:
            raise KeyError(channel_id)
        return max(state.last + 1, state.owed + state.in_flight + reservation)

    def settle(self, channel_id: int, reservation: int, spent: int) -> None:
        """A request ended: its reservation leaves ``in_flight`` and what it cost joins ``owed``."""
        with self._tx() as session:
            row = self._row(session, channel_id)
            row.in_flight = str(max(0, int(row.in_flight) - reservation))
            row.owed = str(int(row.owed) + spent)
            row.updated_at = time.time()
            session.add(row)

    def fold_in_flight(self) -> int:
        """Count every open reservation as spent (their processes are gone: the node may have charged them in
        full); returns how many wei moved. Only safe when no other process of this client is alive."""
        moved = 0
        with self._tx() as session:
            for row in self._rows(session):
                reserved = int(row.in_flight)
                if reserved:
                    moved += reserved
                    row.owed = str(int(row.owed) + reserved)
                    row.in_flight = "0"
                    session.add(row)
        return moved


class ChannelLocks:
    """File locks in ``folder``: one per node (held while a voucher on its channel is in transit) and one per
    wallet (held shared by every live process; exclusively only by a process that finds itself alone).

    ``flock`` locks belong to an open file and vanish with the process, so a crash never leaves one held.
    """

    def __init__(self, folder: Path, prefix: str) -> None:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._folder = folder
        self._prefix = prefix
        self._held: dict[str, int] = {}
        self._wallet_fd: int | None = None

    def _path(self, name: str) -> Path:
        return self._folder / f"{self._prefix}-{name}.lock"

    def join(self, on_alone: Callable[[], object] | None = None) -> bool:
        """Take this process's shared wallet lock; True when no other process held it (this one is alone).

        ``on_alone`` runs first in that case, while the lock is still exclusive: no other process can join (and sign
        a voucher whose reservation it would treat as a dead process's) until it returned.
        """
        fd = os.open(self._path("wallet"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            alone = True
        except BlockingIOError:
            alone = False
        if alone and on_alone is not None:
            try:
                on_alone()
            except BaseException:
                os.close(fd)
                raise
        fcntl.flock(fd, fcntl.LOCK_SH)  # blocks only while another process is joining
        self._wallet_fd = fd
        return alone

    def try_acquire(self, node: str) -> bool:
        """Take ``node``'s admission lock without waiting; False when another process holds it."""
        if node in self._held:
            raise RuntimeError(f"the admission lock of {node} is already held by this wallet")
        fd = os.open(self._path(node.lower()), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._held[node] = fd
        return True

    def release(self, node: str) -> None:
        """Release ``node``'s admission lock (no-op when not held)."""
        fd = self._held.pop(node, None)
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def close(self) -> None:
        """Release every lock."""
        for node in list(self._held):
            self.release(node)
        if self._wallet_fd is not None:
            os.close(self._wallet_fd)
            self._wallet_fd = None
