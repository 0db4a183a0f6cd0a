"""The model node's redeemer: turns the voucher book into on-chain earnings on a schedule and before close deadlines.

Why a service and not only ``ps-node claim``: a voucher is worth something only until its channel's close deadline.
Once a client calls ``startClose`` the node has ``disputeDelay`` seconds to redeem, after which the client reclaims
everything unredeemed (``docs/payments.md``). A node that waits for its operator to run ``claim`` can lose what it
served. :class:`Redeemer` is the one redeem code path (``ps-node serve`` runs it through :class:`RedeemerService`;
``ps-node claim`` calls :meth:`Redeemer.claim`):

- every ``interval_s`` it redeems, in batches of at most ``batch_size`` (<= the contract's 64), each channel whose
  unredeemed amount is at least ``min_worth_wei`` -- dust waits, so gas is not spent on it;
- every close check it reads the chain's ``ChannelCloseStarted`` logs (and, the first time, the state of every channel
  it holds a voucher on, to catch closes that happened while it was down) and redeems each closing channel's latest
  voucher at once, whatever it is worth;
- a voucher is marked redeemed only after its transaction's receipt; a redeem the contract refuses because the
  channel was already redeemed that far (an earlier process died between the receipt and the mark) updates the book
  instead of retrying; a transaction without a receipt in time ("sent, outcome unknown") is remembered by hash and
  looked up before its vouchers are sent again, so it is neither lost nor paid twice for gas;
- a jailed node (the contract refuses its redeems) stops redeeming and says so once, and resumes when it is unjailed.

The chain is the sync ``ledger`` handle, called from a worker thread; one pass at a time holds a lock, so the service
and a ``claim`` in the same process never send the same voucher twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field

import requests
from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from web3 import Web3
from web3.exceptions import TransactionNotFound, Web3Exception

from ledger import (
    ChainError,
    ChannelBook,
    ContractRevert,
    InvalidChainInput,
    PaymentChannels,
    TransactionOutcomeUnknown,
    TxReceipt,
    Voucher,
    VoucherStore,
    Wei,
)
from ledger._payments import MAX_BATCH
from ledger._reverts import (
    PaymentChannelsChannelClosed,
    PaymentChannelsInvalidSignature,
    PaymentChannelsNodeJailed,
    PaymentChannelsNotNode,
    PaymentChannelsUnknownChannel,
    PaymentChannelsVoucherExceedsDeposit,
    PaymentChannelsVoucherNotAboveRedeemed,
)

log = logging.getLogger(__name__)

#: Gas of one single-channel redeem (``bench/gas.py``, anvil 1.7.1: 52,503; 69,496 for a node's first ever).
REDEEM_GAS = 52_503
#: Gas per channel inside a batch of 10 (``bench/gas.py``: 225,726 / 10).
BATCH_REDEEM_GAS_PER_CHANNEL = 22_573
#: Default ``min_worth_wei``: 0.001 ETH. A lone redeem (52,503 gas) at 1 gwei costs 5.25e13 wei, 5.3% of it; the
#: per-channel share of a batch (22,573 gas) 2.3%. Below it the gas would eat a noticeable part of the amount; on
#: a chain with dearer gas raise it (``--redeem-min-wei``), on a rollup at 0.01 gwei it could be 100x lower.
DEFAULT_MIN_WORTH_WEI = 10**15
#: Transactions with an unknown outcome remembered at once; past it the redeemer waits (each holds up to 64 vouchers).
MAX_IN_FLIGHT = 16
_CLOSE_EVENT = "ChannelCloseStarted(uint256,address,uint64)"


@dataclass(frozen=True, slots=True, kw_only=True)
class RedeemerConfig:
    """When and how the redeemer redeems; validated on construction."""

    #: Seconds between scheduled redeems, in (0, 2**31]. One a day already makes a request cost 3.5 gas amortised
    #: (``bench/gas.py``); the default of an hour keeps less money at risk of a slash-free loss (a crash that also
    #: loses the database) for 17.4 gas per request at 1 request/s.
    interval_s: float = 3_600.0
    #: Vouchers per redeem transaction, in [1, 64] (the contract's ``MAX_BATCH``; more per batch is cheaper).
    batch_size: int = MAX_BATCH
    #: Least unredeemed wei a channel must hold to be redeemed on schedule (closing channels: always), >= 1.
    min_worth_wei: int = DEFAULT_MIN_WORTH_WEI
    #: Seconds between reads of the chain for channel closes, in (0, 2**31]; capped by the dispute delay (see
    #: :meth:`Redeemer.close_check_period`).
    close_check_s: float = 30.0
    #: Seconds before a close deadline by which a closing channel should be redeemed, >= 0: the close check runs
    #: often enough to try at least four times before it, and a later detection is logged as a warning.
    deadline_margin_s: float = 600.0
    #: First retry delay after a failed or unknown-outcome redeem, seconds, > 0; doubles per failure.
    backoff_initial_s: float = 2.0
    #: Longest retry delay, seconds, >= ``backoff_initial_s`` (closing channels retry at least every close check).
    backoff_max_s: float = 300.0
    #: Most blocks one ``eth_getLogs`` call spans, in [1, 100000] (public RPCs cap the range).
    log_block_range: int = 5_000
    #: Blocks re-read at each close check, in [0, 1000], so a close moved by a shallow reorg is not missed.
    reorg_depth: int = 12

    def __post_init__(self) -> None:
        for name in ("interval_s", "close_check_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 < value <= 2**31:
                raise InvalidChainInput(name, value, "must be seconds in (0, 2**31]")
        if not isinstance(self.batch_size, int) or not 1 <= self.batch_size <= MAX_BATCH:
            raise InvalidChainInput("batch_size", self.batch_size, f"must be in [1, {MAX_BATCH}]")
        if not isinstance(self.min_worth_wei, int) or isinstance(self.min_worth_wei, bool) or self.min_worth_wei < 1:
            raise InvalidChainInput("min_worth_wei", self.min_worth_wei, "must be wei >= 1")
        if not isinstance(self.deadline_margin_s, int | float) or not 0 <= self.deadline_margin_s <= 2**31:
            raise InvalidChainInput("deadline_margin_s", self.deadline_margin_s, "must be seconds in [0, 2**31]")
        if not 0 < self.backoff_initial_s <= self.backoff_max_s:
            raise InvalidChainInput("backoff_initial_s", self.backoff_initial_s, "must be in (0, backoff_max_s]")
        if not isinstance(self.log_block_range, int) or not 1 <= self.log_block_range <= 100_000:
            raise InvalidChainInput("log_block_range", self.log_block_range, "must be blocks in [1, 100000]")
        if not isinstance(self.reorg_depth, int) or not 0 <= self.reorg_depth <= 1_000:
            raise InvalidChainInput("reorg_depth", self.reorg_depth, "must be blocks in [0, 1000]")


@dataclass(frozen=True, slots=True, kw_only=True)
class RedeemReport:
    """What one redeem pass did."""

    #: Wei newly redeemed by this pass's transactions (and by earlier unknown-outcome ones found mined).
    redeemed_wei: Wei
    #: Channels redeemed by those transactions.
    channels: int
    #: The mined redeem transactions of this pass.
    transactions: tuple[TxReceipt, ...]
    #: Channels the chain had already redeemed that far (the book was behind; now updated, nothing sent).
    caught_up: int
    #: Channels whose close deadline passed before their voucher was redeemed (their rest went to the client).
    lost: tuple[int, ...]
    #: Whether the node is jailed (nothing can be redeemed until it unjails).
    jailed: bool
    #: Whether a transient failure (chain down, a failed or unknown-outcome transaction) left vouchers to retry.
    failed: bool


@dataclass(slots=True)
class RedeemerStats:
    """Counters since the redeemer started (what ``/metrics`` shows)."""

    transactions: int = 0
    channels: int = 0
    redeemed_wei: int = 0
    caught_up: int = 0
    lost: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    jailed: bool = False
    #: Unredeemed wei in the book at the end of the last pass.
    unredeemed_wei: int = 0


@dataclass(slots=True)
class _Pass:
    redeemed: int = 0
    channels: int = 0
    receipts: list[TxReceipt] = field(default_factory=list)
    caught_up: int = 0
    lost: list[int] = field(default_factory=list)
    failed: bool = False
    jailed: bool = False
    #: The first error that stopped the pass (``claim`` raises it).
    error: ChainError | None = None

    def stop(self, exc: BaseException) -> None:
        self.failed = True
        if self.error is None:
            self.error = exc if isinstance(exc, ChainError) else ChainError(f"redeem failed: {type(exc).__name__}")


class Redeemer:
    """Redeems one node's voucher book (``store``) on ``payments`` (a handle signed by the node's operator)."""

    def __init__(self, store: VoucherStore, payments: PaymentChannels, config: RedeemerConfig | None = None) -> None:
        self._store = store
        self._pay = payments
        self._config = config or RedeemerConfig()
        self._operator = payments.account  # OperatorKeyError now, not at the first redeem, when read-only
        self._lock = threading.Lock()
        #: Unknown-outcome transactions by hash, with the vouchers they carry (bounded by MAX_IN_FLIGHT).
        self._in_flight: dict[str, tuple[Voucher, ...]] = {}
        #: Channels this node holds a voucher on whose client started closing: channel id -> ``closesAt``.
        self._closing: dict[int, int] = {}
        #: Channels never to send again in this process (deadline passed, or a voucher the contract refuses).
        self._dead: dict[int, str] = {}
        self._scanned_to: int | None = None
        self._close_topic = Web3.keccak(text=_CLOSE_EVENT)
        self._dispute_delay: int | None = None
        self.stats = RedeemerStats()

    @property
    def config(self) -> RedeemerConfig:
        """The configuration."""
        return self._config

    def close_check_period(self) -> float:
        """Seconds between close checks: ``close_check_s``, but at most a quarter of what the dispute delay leaves
        before the margin (at least 1 s), so a close seen late is still tried four times before the margin."""
        if self._dispute_delay is None:
            self._dispute_delay = self._pay.dispute_delay()
        room = max(1.0, (self._dispute_delay - self._config.deadline_margin_s) / 4)
        return min(self._config.close_check_s, room)

    def redeem_due(self) -> RedeemReport:
        """The scheduled pass: every channel worth ``min_worth_wei``, and every closing one."""
        return self._run(self._config.min_worth_wei)

    def redeem_closing(self) -> RedeemReport:
        """The close check: only channels whose client started closing (whatever they are worth)."""
        return self._run(None)

    def claim(self) -> RedeemReport:
        """Everything that would pay at least one wei, now (``ps-node claim``).

        Unlike the service's passes it raises what stopped it (the node is jailed, the chain is down, a transaction's
        outcome is unknown), with the transactions mined before in the error's ``completed``.
        """
        done = _Pass()
        report = self._run(1, done)
        if done.error is not None:
            done.error.completed = (*done.error.completed, *report.transactions)
            raise done.error
        return report

    # -- one pass ----------------------------------------------------------------------------------------------

    def _run(self, min_worth: int | None, done: _Pass | None = None) -> RedeemReport:
        done = done if done is not None else _Pass()
        with self._lock:
            try:
                self._settle_in_flight(done)
                self._scan_closes()
                now = int(self._pay.w3.eth.get_block("latest")["timestamp"])
            except (ChainError, Web3Exception, requests.RequestException, OSError) as exc:
                self._failure("chain_unavailable", exc)
                done.stop(exc)
                return self._report(done)
            busy = {v.channel_id for vouchers in self._in_flight.values() for v in vouchers}
            closing: list[ChannelBook] = []
            due: list[ChannelBook] = []
            unredeemed = 0
            for book in self._store.books():
                if book.unredeemed <= 0:
                    self._closing.pop(book.channel_id, None)
                    continue
                if book.channel_id in self._dead:
                    continue
                unredeemed += book.unredeemed
                if book.channel_id in busy:
                    continue
                closes_at = self._closing.get(book.channel_id)
                if closes_at is not None:
                    if now >= closes_at:
                        self._lose(book, closes_at, done)
                        continue
                    closing.append(book)
                elif min_worth is not None and book.unredeemed >= min_worth:
                    due.append(book)
            self.stats.unredeemed_wei = unredeemed
            closing.sort(key=lambda b: (self._closing[b.channel_id], b.channel_id))  # nearest deadline first
            due.sort(key=lambda b: (-b.unredeemed, b.channel_id))  # most money first
            queue = [b.latest for b in (*closing, *due)]
            while queue and not done.failed and not done.jailed:
                batch, queue = queue[: self._config.batch_size], queue[self._config.batch_size :]
                self._send(batch, done)
            if done.redeemed or done.caught_up or done.lost:
                left = (b.unredeemed for b in self._store.books() if b.channel_id not in self._dead)
                self.stats.unredeemed_wei = sum(left)
            return self._report(done)

    def _send(self, batch: list[Voucher], done: _Pass) -> None:
        """Redeem ``batch`` (all or nothing); a voucher the contract refuses is handled and the rest sent again."""
        while batch:
            if len(self._in_flight) >= MAX_IN_FLIGHT:
                done.stop(ChainError(f"{MAX_IN_FLIGHT} redeem transactions have an unknown outcome: waiting for them"))
                return
            try:
                receipt = self._pay.redeem(batch[0]) if len(batch) == 1 else self._pay.redeem_batch(batch)
            except PaymentChannelsNodeJailed as exc:
                self._set_jailed(True)
                done.jailed = True
                done.stop(exc)
                done.failed = False  # not transient: retried at the next pass, without backoff
                return
            except (
                PaymentChannelsVoucherNotAboveRedeemed,
                PaymentChannelsChannelClosed,
                PaymentChannelsVoucherExceedsDeposit,
                PaymentChannelsInvalidSignature,
                PaymentChannelsNotNode,
                PaymentChannelsUnknownChannel,
            ) as exc:
                refused = [v for v in batch if v.channel_id == getattr(exc, "channelId", None)]
                if not refused:  # cannot happen with this contract; never loop on it
                    self._failure(exc.error_name, exc)
                    done.stop(exc)
                    return
                self._refused(refused[0], exc, done)
                batch = [v for v in batch if v is not refused[0]]
                continue
            except TransactionOutcomeUnknown as exc:
                self._in_flight[exc.tx_hash] = tuple(batch)
                self._failure("outcome_unknown", exc)
                done.stop(exc)
                return
            except ContractRevert as exc:
                self._failure(exc.error_name or "reverted", exc)
                done.stop(exc)
                return
            except (ChainError, Web3Exception, requests.RequestException, OSError) as exc:
                self._failure(type(exc).__name__, exc)
                done.stop(exc)
                return
            self._set_jailed(False)
            self._mined(batch, receipt, done)
            return

    def _mined(self, vouchers: Sequence[Voucher], receipt: TxReceipt | None, done: _Pass) -> None:
        """Record ``vouchers`` as redeemed by a successful transaction (``receipt``; None: found mined later)."""
        before = {v.channel_id: self._book_redeemed(v.channel_id) for v in vouchers}
        self._store.mark_redeemed(vouchers)
        paid = sum(max(0, v.cumulative_amount - before[v.channel_id]) for v in vouchers)
        for voucher in vouchers:
            self._closing.pop(voucher.channel_id, None)
        done.redeemed += paid
        done.channels += len(vouchers)
        self.stats.channels += len(vouchers)
        self.stats.redeemed_wei += paid
        if receipt is not None:
            done.receipts.append(receipt)
            self.stats.transactions += 1
        log.info(
            "redeemed channels=%d wei=%d tx=%s gas=%s",
            len(vouchers),
            paid,
            receipt.tx_hash if receipt is not None else "earlier",
            receipt.gas_used if receipt is not None else "-",
        )

    def _refused(self, voucher: Voucher, exc: ContractRevert, done: _Pass) -> None:
        channel = voucher.channel_id
        if isinstance(exc, PaymentChannelsVoucherNotAboveRedeemed):
            # Already redeemed that far (by this node before a crash, or another process): the book catches up.
            self._store.mark_redeemed([voucher])
            self._closing.pop(channel, None)
            done.caught_up += 1
            self.stats.caught_up += 1
            log.info("redeem skipped channel=%d reason=already_redeemed onchain=%s", channel, exc.values["redeemed"])
            return
        if isinstance(exc, PaymentChannelsChannelClosed):
            book = self._store.book(channel)
            if book is not None:
                self._lose(book, int(exc.values["closesAt"]), done)
            return
        self._dead[channel] = exc.error_name
        self._closing.pop(channel, None)
        self._count_failure(exc.error_name)
        log.error("redeem refused channel=%d reason=%s: not retried", channel, exc.error_name)

    def _lose(self, book: ChannelBook, closes_at: int, done: _Pass) -> None:
        self._dead[book.channel_id] = "closed"
        self._closing.pop(book.channel_id, None)
        done.lost.append(book.channel_id)
        self.stats.lost += 1
        log.error(
            "redeem too late channel=%d unredeemed_wei=%d closed_at=%d: the client reclaims it",
            book.channel_id,
            book.unredeemed,
            closes_at,
        )

    def _book_redeemed(self, channel_id: int) -> int:
        book = self._store.book(channel_id)
        return 0 if book is None else book.redeemed

    # -- the chain ---------------------------------------------------------------------------------------------

    def _settle_in_flight(self, done: _Pass) -> None:
        """Look up each unknown-outcome transaction: mined -> record it; dropped -> its vouchers may go again."""
        w3 = self._pay.w3
        for tx_hash, vouchers in list(self._in_flight.items()):
            try:
                receipt = w3.eth.get_transaction_receipt(tx_hash)  # type: ignore[arg-type]
            except TransactionNotFound:
                try:
                    w3.eth.get_transaction(tx_hash)  # type: ignore[arg-type]
                except TransactionNotFound:
                    del self._in_flight[tx_hash]
                    log.warning("redeem tx=%s was dropped: its vouchers will be sent again", tx_hash)
                continue
            del self._in_flight[tx_hash]
            if receipt["status"] == 1:
                self._mined(vouchers, None, done)
            else:
                log.warning("redeem tx=%s failed on chain: its vouchers will be sent again", tx_hash)

    def _scan_closes(self) -> None:
        """Learn of channel closes: the first time from each held channel's state, then from new logs."""
        w3 = self._pay.w3
        latest = int(w3.eth.block_number)
        held = {b.channel_id for b in self._store.books() if b.unredeemed > 0}
        if self._scanned_to is None:
            for channel_id in sorted(held - set(self._dead)):
                info = self._pay.channel(channel_id)
                if info is not None and info.closing:
                    self._note_close(channel_id, info.closes_at)
            self._scanned_to = latest
            return
        start = max(0, self._scanned_to - self._config.reorg_depth + 1)
        event = self._pay.contract.events.ChannelCloseStarted()
        for low in range(start, latest + 1, self._config.log_block_range):
            high = min(latest, low + self._config.log_block_range - 1)
            logs = w3.eth.get_logs(
                {"address": self._pay.address, "topics": [self._close_topic], "fromBlock": low, "toBlock": high}
            )
            for entry in logs:
                args = event.process_log(entry)["args"]
                if int(args["channelId"]) in held:
                    self._note_close(int(args["channelId"]), int(args["closesAt"]))
        self._scanned_to = latest

    def _note_close(self, channel_id: int, closes_at: int) -> None:
        if channel_id in self._closing:
            return
        self._closing[channel_id] = closes_at
        left = closes_at - int(self._pay.w3.eth.get_block("latest")["timestamp"])
        if left < self._config.deadline_margin_s:
            log.warning(
                "channel closing channel=%d closes_at=%d seconds_left=%d: inside the margin",
                channel_id,
                closes_at,
                left,
            )
        else:
            log.info("channel closing channel=%d closes_at=%d seconds_left=%d", channel_id, closes_at, left)

    # -- state -------------------------------------------------------------------------------------------------

    def _set_jailed(self, jailed: bool) -> None:
        if jailed and not self.stats.jailed:
            log.error("node jailed: redeeming stopped until the operator runs `ps-node unjail`")
        elif not jailed and self.stats.jailed:
            log.warning("node no longer jailed: redeeming again")
        self.stats.jailed = jailed

    def _failure(self, kind: str, exc: BaseException) -> None:
        self._count_failure(kind)
        log.warning("redeem failed: %s (%s); retrying with backoff", kind, type(exc).__name__)

    def _count_failure(self, kind: str) -> None:
        kind = kind[:48]
        if kind in self.stats.failures or len(self.stats.failures) < 32:  # bounded label set
            self.stats.failures[kind] = self.stats.failures.get(kind, 0) + 1

    def _report(self, done: _Pass) -> RedeemReport:
        return RedeemReport(
            redeemed_wei=Wei(done.redeemed),
            channels=done.channels,
            transactions=tuple(done.receipts),
            caught_up=done.caught_up,
            lost=tuple(done.lost),
            jailed=self.stats.jailed,
            failed=done.failed,
        )


class RedeemerService:
    """Runs a :class:`Redeemer` in the background of a model node's application (``cleanup_ctx``).

    ``open_redeemer`` builds it (blocking: it reads the chain; run in a worker thread, retried with backoff while the
    chain is unreachable, so a node whose chain is down still starts). The first scheduled pass runs at start: a node
    restarted after a crash redeems at once what it served before.
    """

    def __init__(self, open_redeemer: Callable[[], Redeemer], config: RedeemerConfig) -> None:
        self._open = open_redeemer
        self._config = config
        self.redeemer: Redeemer | None = None
        #: Set after each pass (tests and tools wait on it; cleared by whoever waits).
        self.passed = asyncio.Event()

    async def run(self) -> None:
        """Redeem until cancelled: scheduled passes every ``interval_s``, close checks in between."""
        config = self._config
        failures = 0
        loop = asyncio.get_running_loop()
        next_due = next_close = loop.time()
        period: float | None = None
        while True:
            if self.redeemer is None or period is None:  # opened, but the chain failed before the period was read
                try:
                    if self.redeemer is None:
                        self.redeemer = await asyncio.to_thread(self._open)
                    period = await asyncio.to_thread(self.redeemer.close_check_period)
                except Exception as exc:  # the chain, or the voucher book (locked, its driver): as a pass's failure
                    failures += 1
                    log.warning("redeemer cannot start yet: %s; retrying", type(exc).__name__)
                    await asyncio.sleep(_backoff(config, failures))
                    continue
                log.info(
                    "redeemer started interval_s=%g close_check_s=%g min_worth_wei=%d",
                    config.interval_s,
                    period,
                    config.min_worth_wei,
                )
            now = loop.time()
            scheduled = now >= next_due
            if scheduled or now >= next_close:
                redeemer = self.redeemer
                try:
                    failed = (
                        await asyncio.to_thread(redeemer.redeem_due if scheduled else redeemer.redeem_closing)
                    ).failed
                except Exception as exc:
                    # Anything the pass does not expect (the voucher book locked past its timeout by a `ps-node claim`
                    # in another process, a database driver error) must not end the service: a closing channel not
                    # redeemed before its deadline is lost. Logged by type only (a driver's message can hold the
                    # vouchers' signatures), counted, and retried with backoff.
                    redeemer._failure(type(exc).__name__, exc)
                    failed = True
                self.passed.set()
                now = loop.time()
                if failed:
                    failures += 1
                    retry = _backoff(config, failures)
                    next_close = now + min(retry, period)  # closing channels retry at least every close check
                    if scheduled:
                        next_due = now + retry
                else:
                    failures = 0
                    next_close = now + period
                    if scheduled:
                        next_due = now + config.interval_s
            await asyncio.sleep(max(0.0, min(next_due, next_close) - loop.time()))

    async def cleanup_ctx(self, _app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup context: the redeemer task runs while the application does, cancelled and awaited after."""
        task = asyncio.create_task(self.run(), name="planetserve-redeemer")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _backoff(config: RedeemerConfig, failures: int) -> float:
    return float(min(config.backoff_max_s, config.backoff_initial_s * 2 ** min(failures - 1, 30)))


class RedeemerCollector(Collector):
    """The redeemer's counters for the node's Prometheus registry (read at scrape time; labels: failure kinds)."""

    def __init__(self, service: RedeemerService) -> None:
        self._service = service

    def collect(self) -> Iterator[Metric]:
        redeemer = self._service.redeemer
        stats = redeemer.stats if redeemer is not None else RedeemerStats()
        for name, value, doc in (
            ("planetserve_redeem_transactions", stats.transactions, "Redeem transactions mined."),
            ("planetserve_redeem_channels", stats.channels, "Channel vouchers redeemed."),
            ("planetserve_redeem_wei", stats.redeemed_wei, "Wei redeemed into locked earnings."),
            ("planetserve_redeem_caught_up", stats.caught_up, "Vouchers found already redeemed on chain."),
            ("planetserve_redeem_lost_channels", stats.lost, "Closing channels whose deadline passed unredeemed."),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        failures = CounterMetricFamily(
            "planetserve_redeem_failures", "Failed redeem attempts by kind.", labels=["kind"]
        )
        for kind, count in sorted(stats.failures.items()):
            failures.add_metric([kind], count)
        yield failures
        yield GaugeMetricFamily("planetserve_redeem_jailed", "1 while the node is jailed.", value=int(stats.jailed))
        yield GaugeMetricFamily(
            "planetserve_redeem_unredeemed_wei",
            "Unredeemed wei in the book after the last pass.",
            value=stats.unredeemed_wei,
        )
