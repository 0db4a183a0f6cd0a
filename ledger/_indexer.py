"""The registry as the indexer sees it: ``NodeRegistry`` events folded into SQL tables (SQLModel).

Design (see ``docs/chain.md``): the indexer reads only events. Each log is applied at most once, keyed by
(registry, block number, log index) in ``ledger_events``; a batch of blocks is applied in one database transaction
together with the cursor (last indexed block and its hash), so stopping at any point loses nothing and repeats
nothing. Before each sync the stored block hash is compared with the chain's: if the chain was reset (a fresh anvil)
or reorganised below the cursor, every row of that registry is dropped and indexing restarts at the deploy block.
Amounts in wei are stored as decimal strings (SQLite integers are 64-bit; wei is not).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, column, delete, func
from sqlmodel import Field, Session, SQLModel, col, create_engine, select
from web3.exceptions import LogTopicError, MismatchedABI
from web3.types import EventData, LogReceipt

from ledger._artifacts import load_artifact
from ledger._deploy import Deployment
from ledger._errors import ChainError
from ledger._registry import NodeRegistry
from ledger._types import Role, Wei, checksum

#: Blocks per ``eth_getLogs`` request and per database transaction (bounds memory and RPC response size).
DEFAULT_BATCH_BLOCKS = 2_000


class IndexerError(ChainError):
    """A log could not be decoded strictly, or the index is inconsistent with the chain."""

    code = "chain_indexer_error"


class NodeRow(SQLModel, table=True):
    """Current state of one operator's node."""

    __tablename__ = "ledger_nodes"
    source: str = Field(primary_key=True)
    operator: str = Field(primary_key=True)
    role: int
    endpoint: str
    x25519_public_key: str
    model_id: str
    price_per_1k_tokens: str
    stake: str
    status: str = Field(index=True)
    unbonding_ends_at: int = 0
    registered_block: int
    updated_block: int


class StakeChangeRow(SQLModel, table=True):
    """One change of an operator's bonded stake (register, add, slash, deregister)."""

    __tablename__ = "ledger_stake_changes"
    source: str = Field(primary_key=True)
    block_number: int = Field(primary_key=True)
    log_index: int = Field(primary_key=True)
    operator: str = Field(index=True)
    kind: str
    delta: str
    new_stake: str


class UnbondingRow(SQLModel, table=True):
    """One unbonding request."""

    __tablename__ = "ledger_unbondings"
    source: str = Field(primary_key=True)
    block_number: int = Field(primary_key=True)
    log_index: int = Field(primary_key=True)
    operator: str = Field(index=True)
    stake: str
    unbonding_ends_at: int


class SlashRow(SQLModel, table=True):
    """One slash."""

    __tablename__ = "ledger_slashes"
    source: str = Field(primary_key=True)
    block_number: int = Field(primary_key=True)
    log_index: int = Field(primary_key=True)
    operator: str = Field(index=True)
    slasher: str
    amount: str
    remaining_stake: str
    evidence_hash: str


class EventRow(SQLModel, table=True):
    """Every applied log: the idempotency key and an audit trail."""

    __tablename__ = "ledger_events"
    source: str = Field(primary_key=True)
    block_number: int = Field(primary_key=True)
    log_index: int = Field(primary_key=True)
    tx_hash: str
    name: str


class CursorRow(SQLModel, table=True):
    """How far a registry is indexed, and the hash that block had (to detect resets and reorgs)."""

    __tablename__ = "ledger_cursor"
    source: str = Field(primary_key=True)
    chain_id: int
    deploy_block: int
    last_block: int
    last_block_hash: str


_TABLES = [NodeRow, StakeChangeRow, UnbondingRow, SlashRow, EventRow, CursorRow]


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncReport:
    """What one ``sync`` did."""

    #: First block examined (inclusive); greater than ``to_block`` when there was nothing new.
    from_block: int
    #: Last block indexed (inclusive).
    to_block: int
    #: Logs applied now.
    applied: int
    #: Logs skipped because they were applied before.
    skipped: int
    #: Whether the stored index was dropped because the chain no longer matched it.
    reset: bool


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
    #: Model id (32 bytes; zero for relays).
    model_id: bytes
    #: Price in wei per 1000 tokens.
    price_per_1k_tokens: Wei
    #: Bonded stake in wei.
    stake: Wei
    #: ``active``, ``unbonding`` or ``deregistered``.
    status: str
    #: Whether the node is routable: active status and stake at least the role's minimum.
    active: bool
    #: Unix time the unbonding ends (0 while bonded).
    unbonding_ends_at: int


class Indexer:
    """Folds one deployment's registry events into a SQL database (default SQLite, any SQLAlchemy URL)."""

    def __init__(self, registry: NodeRegistry, deployment: Deployment, db_url: str) -> None:
        self._registry = registry
        self._deployment = deployment
        self._key: str = registry.address
        self._engine: Engine = create_engine(db_url)
        SQLModel.metadata.create_all(self._engine, tables=[t.__table__ for t in _TABLES])  # type: ignore[attr-defined]
        self._minimums = {
            Role.MODEL: int(deployment.params.get("minimumStakeModel", 0)),
            Role.RELAY: int(deployment.params.get("minimumStakeRelay", 0)),
            Role.VERIFIER: int(deployment.params.get("minimumStakeVerifier", 0)),
        }
        contract = registry.contract
        self._decoders: dict[bytes, tuple[str, Callable[[LogReceipt], EventData]]] = {}
        for item in load_artifact("NodeRegistry").abi:
            if item.get("type") == "event":
                name = str(item["name"])
                signature = f"{name}({','.join(str(p['type']) for p in item['inputs'])})"
                topic = bytes(registry.w3.keccak(text=signature))
                self._decoders[topic] = (name, contract.events[name]().process_log)

    def close(self) -> None:
        """Release database connections."""
        self._engine.dispose()

    def __enter__(self) -> Indexer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- syncing -----------------------------------------------------------------------------------------------

    def sync(self, *, to_block: int | None = None, batch_blocks: int = DEFAULT_BATCH_BLOCKS) -> SyncReport:
        """Index from the cursor up to ``to_block`` (default: the chain head), one transaction per batch."""
        if batch_blocks < 1:
            raise ValueError("batch_blocks must be >= 1")
        w3 = self._registry.w3
        head = w3.eth.block_number
        target = head if to_block is None else min(to_block, head)
        reset = self._reset_if_diverged()
        cursor = self._cursor()
        start = self._deployment.deploy_block if cursor is None else cursor.last_block + 1
        applied = skipped = 0
        block = start
        while block <= target:
            end = min(block + batch_blocks - 1, target)
            logs = w3.eth.get_logs({"address": self._registry.address, "fromBlock": block, "toBlock": end})
            end_hash = w3.eth.get_block(end).get("hash")
            assert end_hash is not None, "a mined block has a hash"
            with Session(self._engine) as session:
                for log in sorted(logs, key=lambda lg: (lg["blockNumber"], lg["logIndex"])):
                    if self._apply(session, log):
                        applied += 1
                    else:
                        skipped += 1
                self._save_cursor(session, end, end_hash.to_0x_hex())
                session.commit()
            block = end + 1
        return SyncReport(from_block=start, to_block=target, applied=applied, skipped=skipped, reset=reset)

    def _cursor(self) -> CursorRow | None:
        with Session(self._engine) as session:
            return session.get(CursorRow, self._key)

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

    def _reset_if_diverged(self) -> bool:
        """Drop this registry's rows when the chain no longer has the cursor's block (reset or reorg)."""
        cursor = self._cursor()
        if cursor is None:
            return False
        diverged = cursor.chain_id != self._deployment.chain_id or cursor.deploy_block != self._deployment.deploy_block
        if not diverged:
            try:
                chain_hash = self._registry.w3.eth.get_block(cursor.last_block).get("hash")
            except Exception:  # BlockNotFound: the chain is shorter than the cursor
                chain_hash = None
            diverged = chain_hash is None or chain_hash.to_0x_hex() != cursor.last_block_hash
        if not diverged:
            return False
        with Session(self._engine) as session:
            for table in _TABLES:
                session.execute(delete(table).where(column("source") == self._key))
            session.commit()
        return True

    # -- applying events ---------------------------------------------------------------------------------------

    def _decode(self, log: LogReceipt) -> tuple[str, dict[str, Any]]:
        topics = log["topics"]
        if not topics or bytes(topics[0]) not in self._decoders:
            raise IndexerError(f"unknown event topic in log {log['blockNumber']}:{log['logIndex']}")
        name, process = self._decoders[bytes(topics[0])]
        try:
            event = process(log)
        except (MismatchedABI, LogTopicError, ValueError) as exc:
            raise IndexerError(f"cannot decode {name} at {log['blockNumber']}:{log['logIndex']}") from exc
        return name, dict(event["args"])

    def _apply(self, session: Session, log: LogReceipt) -> bool:
        key = (self._key, log["blockNumber"], log["logIndex"])
        if session.get(EventRow, key) is not None:
            return False
        name, args = self._decode(log)
        block, index = log["blockNumber"], log["logIndex"]
        session.add(
            EventRow(
                source=self._key,
                block_number=block,
                log_index=index,
                tx_hash=log["transactionHash"].to_0x_hex(),
                name=name,
            )
        )
        handler = getattr(self, f"_on_{name}", None)
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
                delta=str(delta),
                new_stake=str(new),
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
                price_per_1k_tokens=str(a["pricePer1kTokens"]),
                stake=str(a["stake"]),
                status="active",
                unbonding_ends_at=0,
                registered_block=block,
                updated_block=block,
            )
        )
        self._stake_change(session, block, index, operator, "register", int(a["stake"]), int(a["stake"]))

    def _on_StakeAdded(self, session: Session, block: int, index: int, a: dict[str, Any]) -> None:
        row = self._node(session, a["operator"])
        row.stake, row.updated_block = str(a["newStake"]), block
        session.add(row)
        self._stake_change(session, block, index, a["operator"], "add", int(a["amount"]), int(a["newStake"]))

    def _on_NodeUpdated(self, session: Session, block: int, index: int, a: dict[str, Any]) -> None:
        row = self._node(session, a["operator"])
        row.endpoint = str(a["endpoint"])
        row.x25519_public_key = bytes(a["x25519PublicKey"]).hex()
        row.price_per_1k_tokens = str(a["pricePer1kTokens"])
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
                stake=str(a["stake"]),
                unbonding_ends_at=int(a["unbondingEndsAt"]),
            )
        )

    def _on_NodeDeregistered(self, session: Session, block: int, index: int, a: dict[str, Any]) -> None:
        row = self._node(session, a["operator"])
        row.status, row.stake, row.updated_block = "deregistered", "0", block
        session.add(row)
        released = int(a["releasedStake"])
        self._stake_change(session, block, index, a["operator"], "deregister", -released, 0)

    def _on_NodeSlashed(self, session: Session, block: int, index: int, a: dict[str, Any]) -> None:
        row = self._node(session, a["operator"])
        row.stake, row.updated_block = str(a["remainingStake"]), block
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
                amount=str(amount),
                remaining_stake=str(remaining),
                evidence_hash=bytes(a["evidenceHash"]).hex(),
            )
        )

    # -- queries -----------------------------------------------------------------------------------------------

    def nodes(self, *, include_deregistered: bool = False) -> list[IndexedNode]:
        """Every indexed node, ordered by registration block then operator."""
        with Session(self._engine) as session:
            query = select(NodeRow).where(col(NodeRow.source) == self._key)
            rows: Sequence[NodeRow] = session.exec(query).all()
        result = [self._to_node(r) for r in rows if include_deregistered or r.status != "deregistered"]
        return sorted(result, key=lambda n: (n.role, n.operator))

    def stake_changes(self, operator: str) -> list[tuple[str, int, int]]:
        """``(kind, delta_wei, new_stake_wei)`` of ``operator`` in chain order."""
        with Session(self._engine) as session:
            query = select(StakeChangeRow).where(
                col(StakeChangeRow.source) == self._key, col(StakeChangeRow.operator) == checksum(operator)
            )
            rows = sorted(session.exec(query).all(), key=lambda r: (r.block_number, r.log_index))
        return [(r.kind, int(r.delta), int(r.new_stake)) for r in rows]

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
            model_id=bytes.fromhex(row.model_id),
            price_per_1k_tokens=Wei(int(row.price_per_1k_tokens)),
            stake=Wei(stake),
            status=row.status,
            active=row.status == "active" and stake >= self._minimums[role],
            unbonding_ends_at=row.unbonding_ends_at,
        )
