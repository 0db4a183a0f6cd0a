"""The model node's durable voucher book: the latest voucher per channel, checked and committed before serving.

Why durable, and why before the answer: the latest voucher *is* the node's money. It is committed to the database
(SQLite by default, fsync'd on commit; any SQLAlchemy URL) before :meth:`VoucherStore.accept` returns, so a node
that crashes after answering still holds a voucher covering that answer and redeems it after a restart.

The acceptance rule (:meth:`VoucherStore.accept`), checked in this order; the first failure raises its own
:class:`~ledger.VoucherRejected` leaf with a stable ``code``:

1. ``voucher_wrong_chain``: the voucher's chain id is not the node's chain.
2. ``voucher_wrong_contract``: the voucher's contract is not the node's ``PaymentChannels``.
3. ``voucher_wrong_channel``: the channel does not exist on chain, or its node is not this node.
4. ``voucher_channel_closing``: the client started closing the channel (new work might not be redeemable in time).
5. ``voucher_forged``: the signature is malformed, high-s, or not by the channel's client.
6. ``voucher_replayed``: the amount equals the latest accepted amount on the channel.
7. ``voucher_stale``: the amount is below the latest accepted amount, or not above the amount redeemed on chain.
8. ``voucher_underpaid``: ``amount < owed + reserved + ceil(price_per_1k * (prompt_tokens + max_tokens) / 1000)``,
   where ``owed`` is what finished requests actually cost (starting at the on-chain ``redeemed`` when the
   channel is first seen) and ``reserved`` the reservations of requests still being served.
9. ``voucher_underfunded``: the amount exceeds the channel's deposit.

On success the voucher becomes the channel's latest, this request's reservation is added to ``reserved``, and
both are committed. After the answer, :meth:`VoucherStore.settle` replaces the reservation by the actual cost
``ceil(price_per_1k * used_tokens / 1000)`` in ``owed``: the next voucher's baseline is the previous one plus what
was really used. A reservation left by a process that died before ``settle`` counts as fully used when the store is
next opened (the client signed for it; the answer may have been delivered).

One store per node process: checks and writes are serialised by a lock held across the database transaction.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from eth_typing import ChecksumAddress
from sqlalchemy import Engine
from sqlmodel import Field, Session, SQLModel, col, create_engine, select

from ledger._amount import WeiAmount
from ledger._errors import ChainError, InvalidChainInput
from ledger._payments import MAX_BATCH, ChannelInfo
from ledger._types import Wei, checksum
from ledger._vouchers import (
    Voucher,
    VoucherChannelClosing,
    VoucherDomain,
    VoucherForged,
    VoucherReplayed,
    VoucherStale,
    VoucherUnderfunded,
    VoucherUnderpaid,
    VoucherWrongChain,
    VoucherWrongChannel,
    VoucherWrongContract,
    recover_voucher_signer,
)

#: The largest token count one request may reserve (bounds the arithmetic and catches unit mix-ups).
MAX_TOKENS_PER_REQUEST = 1 << 32


class ChannelSource(Protocol):
    """Where the store reads a channel's on-chain state (``PaymentChannels`` satisfies it)."""

    def channel(self, channel_id: int) -> ChannelInfo | None:
        """The channel, or None when it does not exist."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class PriceRule:
    """The price of one request: the node's registered price and the request's token counts."""

    #: The node's price in wei per 1000 tokens (as registered on chain), >= 0.
    price_per_1k_tokens: Wei
    #: Tokens in the prompt, >= 0.
    prompt_tokens: int
    #: The most tokens the request may generate, >= 0.
    max_tokens: int

    def __post_init__(self) -> None:
        if not isinstance(self.price_per_1k_tokens, int) or not 0 <= self.price_per_1k_tokens < 2**128:
            raise InvalidChainInput("price_per_1k_tokens", self.price_per_1k_tokens, "must be wei in [0, 2**128)")
        for name in ("prompt_tokens", "max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_TOKENS_PER_REQUEST:
                raise InvalidChainInput(name, value, f"must be tokens in [0, {MAX_TOKENS_PER_REQUEST}]")

    def cost(self, tokens: int) -> Wei:
        """``ceil(price_per_1k_tokens * tokens / 1000)`` wei: rounding up, so 1 token at any price costs >= 1 wei."""
        return Wei(-(-self.price_per_1k_tokens * tokens // 1000))

    @property
    def reservation(self) -> Wei:
        """The most this request can cost: prompt plus ``max_tokens``."""
        return self.cost(self.prompt_tokens + self.max_tokens)


@dataclass(frozen=True, slots=True, kw_only=True)
class AcceptedVoucher:
    """A voucher the store accepted for one request; hand it back to :meth:`VoucherStore.settle` after serving."""

    #: The accepted voucher (now the channel's latest).
    voucher: Voucher
    #: The channel's client.
    client: ChecksumAddress
    #: The price this request was accepted at.
    price: PriceRule
    #: The reservation held for it until ``settle``, in wei.
    reservation: Wei


@dataclass(frozen=True, slots=True, kw_only=True)
class ChannelBook:
    """The node's own account of one channel."""

    #: The channel id.
    channel_id: int
    #: The latest accepted voucher.
    latest: Voucher
    #: What finished requests actually cost, in wei (cumulative, including what was redeemed before).
    owed: Wei
    #: Reservations of requests still being served, in wei.
    reserved: Wei
    #: The cumulative amount last known redeemed on chain, in wei.
    redeemed: Wei

    @property
    def unredeemed(self) -> Wei:
        """What redeeming the latest voucher would pay now, in wei."""
        return Wei(max(0, self.latest.cumulative_amount - self.redeemed))


class StoredVoucher(SQLModel, table=True):
    """One channel's row: its latest voucher and the node's book. Amounts (and the uint256 channel id) use
    :class:`~ledger._amount.WeiAmount`: ``NUMERIC(78,0)`` on PostgreSQL, order-preserving strings on SQLite."""

    __tablename__ = "payment_vouchers"

    chain_id: int = Field(primary_key=True)
    contract: str = Field(primary_key=True, max_length=42)
    channel_id: int = Field(primary_key=True, sa_type=WeiAmount)
    client: str = Field(max_length=42)
    cumulative_amount: int = Field(sa_type=WeiAmount)
    #: 0x-hex of the 65-byte signature.
    signature: str = Field(max_length=132)
    owed: int = Field(sa_type=WeiAmount)
    reserved: int = Field(sa_type=WeiAmount)
    redeemed: int = Field(sa_type=WeiAmount)
    #: Unix time of the last write (seconds).
    updated_at: float


class VoucherStore:
    """The latest voucher per channel of one node on one contract, in a SQL database.

    ``url`` is a SQLAlchemy URL (``sqlite:///path/to/vouchers.db``) or an ``Engine``. ``channels`` reads the
    on-chain channel (a :class:`~ledger.PaymentChannels` handle, or a cache in front of one).

    :meth:`close` (or leaving a ``with`` block) releases the database connections of an engine the store created
    from a URL; an ``Engine`` passed in stays its owner's to dispose. A closed store refuses further use.
    """

    def __init__(self, url: str | Engine, *, domain: VoucherDomain, node: str, channels: ChannelSource) -> None:
        self._owns_engine = isinstance(url, str)
        self._closed = False
        self._engine = create_engine(url) if isinstance(url, str) else url
        self._domain = domain
        self._node = checksum(node, param="node")
        self._channels = channels
        self._lock = threading.Lock()
        SQLModel.metadata.create_all(self._engine, tables=[StoredVoucher.__table__])  # type: ignore[attr-defined]
        self._recover_reservations()

    def close(self) -> None:
        """Release the database connections (idempotent).

        Why explicit: the pooled connections (each an open file on SQLite) would otherwise wait for the garbage
        collector, which closes them at some later point with a ``ResourceWarning``; a node process opens its book
        once and closes it on shutdown, a command when it is done.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._owns_engine:
                self._engine.dispose()

    def __enter__(self) -> VoucherStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _session(self) -> Session:
        if self._closed:
            raise ChainError("the voucher store is closed")
        return Session(self._engine)

    @property
    def domain(self) -> VoucherDomain:
        """The chain and contract this store accepts vouchers for."""
        return self._domain

    def accept(self, voucher: Voucher, price: PriceRule) -> AcceptedVoucher:
        """Check ``voucher`` for one request priced by ``price`` and commit it as the channel's latest.

        Follows the module's acceptance rule; raises the first failing rule's ``VoucherRejected`` leaf and changes
        nothing then. Returns only after the commit, so the caller may serve the request.
        """
        channel_id = voucher.channel_id
        if voucher.domain.chain_id != self._domain.chain_id:
            raise VoucherWrongChain(channel_id, self._domain.chain_id, voucher.domain.chain_id)
        if voucher.domain.contract != self._domain.contract:
            raise VoucherWrongContract(channel_id, self._domain.contract, voucher.domain.contract)
        channel = self._channels.channel(channel_id)
        if channel is None:
            raise VoucherWrongChannel(channel_id, None)
        if channel.node != self._node:
            raise VoucherWrongChannel(channel_id, channel.node)
        if channel.closing:
            raise VoucherChannelClosing(channel_id, channel.closes_at)
        signer = recover_voucher_signer(voucher)
        if signer != channel.client:
            raise VoucherForged(channel_id, signer, channel.client)
        amount = voucher.cumulative_amount
        with self._lock, self._session() as session:
            row = session.get(StoredVoucher, self._key(channel_id))
            latest = row.cumulative_amount if row is not None else None
            owed = row.owed if row is not None else channel.redeemed
            reserved = row.reserved if row is not None else 0
            redeemed = max(channel.redeemed, row.redeemed if row is not None else 0)
            if latest is not None and amount == latest:
                raise VoucherReplayed(channel_id, amount)
            if latest is not None and amount < latest:
                raise VoucherStale(channel_id, amount, latest)
            if amount <= redeemed:
                raise VoucherStale(channel_id, amount, redeemed)
            required = owed + reserved + price.reservation
            if amount < required:
                raise VoucherUnderpaid(channel_id, amount, required)
            if amount > channel.deposit:
                raise VoucherUnderfunded(channel_id, amount, channel.deposit)
            if row is None:
                row = StoredVoucher(
                    chain_id=self._domain.chain_id,
                    contract=self._domain.contract,
                    channel_id=channel_id,
                    client=channel.client,
                    cumulative_amount=0,
                    signature="",
                    owed=owed,
                    reserved=0,
                    redeemed=redeemed,
                    updated_at=0.0,
                )
            row.cumulative_amount = amount
            row.signature = "0x" + voucher.signature.hex()
            row.reserved = reserved + price.reservation
            row.redeemed = redeemed
            row.updated_at = time.time()
            session.add(row)
            session.commit()
        return AcceptedVoucher(voucher=voucher, client=channel.client, price=price, reservation=price.reservation)

    def settle(self, accepted: AcceptedVoucher, used_tokens: int) -> Wei:
        """Charge the request ``accepted`` was for by what it used (prompt plus generated tokens); returns the cost.

        ``used_tokens`` must not exceed the reservation's ``prompt_tokens + max_tokens``. Call it once per accepted
        request, also when serving failed (with the tokens actually processed, possibly 0).
        """
        limit = accepted.price.prompt_tokens + accepted.price.max_tokens
        if not isinstance(used_tokens, int) or not 0 <= used_tokens <= limit:
            raise InvalidChainInput("used_tokens", used_tokens, f"must be tokens in [0, {limit}]")
        cost = accepted.price.cost(used_tokens)
        channel_id = accepted.voucher.channel_id
        with self._lock, self._session() as session:
            row = session.get(StoredVoucher, self._key(channel_id))
            if row is None:
                raise ChainError(f"no voucher book for channel {channel_id}: settle without accept")
            row.owed += cost
            row.reserved = max(0, row.reserved - accepted.reservation)
            row.updated_at = time.time()
            session.add(row)
            session.commit()
        return cost

    def book(self, channel_id: int) -> ChannelBook | None:
        """The node's account of ``channel_id``, or None when it never accepted a voucher there."""
        with self._session() as session:
            row = session.get(StoredVoucher, self._key(channel_id))
            return None if row is None else self._to_book(row)

    def books(self) -> list[ChannelBook]:
        """Every channel this node ever accepted a voucher on (this contract), by channel id.

        Unbounded by design, like :meth:`redeemable`: one row per channel the node served (a bounded number of
        clients). The redeemer reads it to pick what to redeem (``redeemable`` caps at one batch).
        """
        with self._session() as session:
            rows = session.exec(
                select(StoredVoucher).where(
                    col(StoredVoucher.chain_id) == self._domain.chain_id,
                    col(StoredVoucher.contract) == self._domain.contract,
                )
            ).all()
            books = [self._to_book(row) for row in rows]
        return sorted(books, key=lambda b: b.channel_id)

    def redeemable(self, limit: int = MAX_BATCH) -> list[Voucher]:
        """Up to ``limit`` latest vouchers that would pay something when redeemed, largest unredeemed first.

        Reads every row of this node's contract (one per channel it ever served; unbounded by design, a node serves
        a bounded number of clients) and sorts in Python: ``latest - redeemed`` cannot be computed in SQL on
        SQLite's string encoding of uint256.
        """
        if not 1 <= limit <= MAX_BATCH:
            raise InvalidChainInput("limit", limit, f"must be in [1, {MAX_BATCH}]")
        with self._session() as session:
            rows = session.exec(
                select(StoredVoucher).where(
                    col(StoredVoucher.chain_id) == self._domain.chain_id,
                    col(StoredVoucher.contract) == self._domain.contract,
                )
            ).all()
            books = [self._to_book(row) for row in rows]
        pending = [b for b in books if b.unredeemed > 0]
        pending.sort(key=lambda b: b.unredeemed, reverse=True)
        return [b.latest for b in pending[:limit]]

    def mark_redeemed(self, vouchers: Sequence[Voucher]) -> None:
        """Record that ``vouchers`` were redeemed on chain (after the transaction's receipt)."""
        with self._lock, self._session() as session:
            for voucher in vouchers:
                row = session.get(StoredVoucher, self._key(voucher.channel_id))
                if row is None:
                    continue
                row.redeemed = max(row.redeemed, voucher.cumulative_amount)
                row.updated_at = time.time()
                session.add(row)
            session.commit()

    def _key(self, channel_id: int) -> tuple[int, str, int]:
        return (self._domain.chain_id, self._domain.contract, channel_id)

    def _to_book(self, row: StoredVoucher) -> ChannelBook:
        voucher = Voucher(
            domain=self._domain,
            channel_id=row.channel_id,
            cumulative_amount=Wei(row.cumulative_amount),
            signature=bytes.fromhex(row.signature[2:]),
        )
        return ChannelBook(
            channel_id=row.channel_id,
            latest=voucher,
            owed=Wei(row.owed),
            reserved=Wei(row.reserved),
            redeemed=Wei(row.redeemed),
        )

    def _recover_reservations(self) -> None:
        """Count reservations a previous process left open (it died mid-request) as fully used."""
        with self._lock, self._session() as session:
            rows = session.exec(
                select(StoredVoucher).where(
                    col(StoredVoucher.chain_id) == self._domain.chain_id,
                    col(StoredVoucher.contract) == self._domain.contract,
                    col(StoredVoucher.reserved) != 0,
                )
            ).all()
            for row in rows:
                row.owed += row.reserved
                row.reserved = 0
                session.add(row)
            session.commit()
