"""The model node's redeemer against a real anvil and SQLite voucher books: on a schedule, before close deadlines,
never twice, through unknown outcomes and jail; and ``ps-node serve`` running it as a separate process.

Vouchers reach the book through ``VoucherStore.accept``/``settle``, the calls the node's payment gate makes per
request (the gate itself is tested live in ``test_payments_overlay.py``): 1 wei per token, each request reserving
30 tokens and using 25.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import sqlite3
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy.pool import StaticPool
from sqlmodel import create_engine

from cli.exit_codes import ExitCode
from ledger import (
    ChainNotReachable,
    InvalidChainInput,
    PaymentChannels,
    PriceRule,
    Role,
    TransactionOutcomeUnknown,
    VoucherStore,
    Wei,
    dev_account,
    model_id,
)
from ledger._reverts import PaymentChannelsNodeJailed
from node.overlay._redeemer import Redeemer, RedeemerCollector, RedeemerConfig, RedeemerService
from tests._cli import InProcess, assert_failed, cli_env, serve_ready, spawn_serve
from tests.fixtures.chain import OWNER, SLASHER, TEST_PARAMS, ChainEnv, rpc
from tests.fixtures.payments import deploy_with_jail_switch, eth_balance, payments, spent, voucher

NODE, CLIENT, OTHER_CLIENT = 1, 10, 11
RULE = PriceRule(price_per_1k_tokens=Wei(1_000), prompt_tokens=10, max_tokens=20)
DEPOSIT = 10_000
#: Fast enough for tests; dust below 100 wei waits.
FAST = RedeemerConfig(interval_s=0.2, close_check_s=0.2, min_worth_wei=100, backoff_initial_s=0.05, backoff_max_s=0.2)


def _store(pay: PaymentChannels, path: Path) -> VoucherStore:
    return VoucherStore(f"sqlite:///{path}", domain=pay.domain(), node=dev_account(NODE).address, channels=pay)


def _open(pay: PaymentChannels, client: int = CLIENT, deposit: int = DEPOSIT) -> int:
    return pay.with_account(dev_account(client)).open_channel(dev_account(NODE).address, deposit).channel_id


def _serve(store: VoucherStore, pay: PaymentChannels, channel: int, requests: int, client: int = CLIENT) -> int:
    """Accept and settle ``requests`` paid requests on ``channel``; returns the latest voucher's amount."""
    book = store.book(channel)
    owed = book.owed if book is not None else 0
    latest = 0
    for _ in range(requests):
        accepted = store.accept(voucher(pay, client, channel, owed + 30), RULE)
        latest = accepted.voucher.cumulative_amount
        owed += store.settle(accepted, used_tokens=25)
    return latest


def _nonce(chain: ChainEnv) -> int:
    return int(chain.w3.eth.get_transaction_count(dev_account(NODE).address, "pending"))


def _redeemer(chain: ChainEnv, path: Path, config: RedeemerConfig = FAST, **handle: float) -> Redeemer:
    pay = payments(chain)
    node = PaymentChannels(chain.w3, pay.address, dev_account(NODE), **handle)
    return Redeemer(_store(pay, path), node, config)


async def _until(condition: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(condition):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_a_scheduled_redeem_pays_n_requests_in_one_transaction_exact_to_the_wei(
    chain: ChainEnv, tmp_path: Path
) -> None:
    pay = payments(chain)
    store = _store(pay, tmp_path / "book.db")
    channel = _open(pay)
    latest = _serve(store, pay, channel, 20)
    assert latest == 19 * 25 + 30  # 20 requests: what 19 used plus the last one's reservation
    nonce = _nonce(chain)
    node = pay.with_account(dev_account(NODE))
    service = RedeemerService(lambda: Redeemer(store, node, FAST), FAST)
    task = asyncio.create_task(service.run())
    try:
        await _until(lambda: service.redeemer is not None and service.redeemer.stats.transactions == 1)
        await asyncio.sleep(0.5)  # two more scheduled passes: nothing left to send
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert _nonce(chain) == nonce + 1  # one transaction for the 20 requests
    assert pay.balances(dev_account(NODE).address).locked == latest
    assert store.book(channel).redeemed == latest  # type: ignore[union-attr]
    assert pay.channel(channel).redeemed == latest  # type: ignore[union-attr]
    # The client gets exactly the rest back.
    client = pay.with_account(dev_account(CLIENT))
    client.start_close(channel)
    chain.advance(pay.dispute_delay())
    client.finish_close(channel)
    before = eth_balance(chain.w3, CLIENT)
    receipt = client.withdraw()
    assert eth_balance(chain.w3, CLIENT) == before + DEPOSIT - latest - spent(receipt)


async def test_a_closing_channel_is_redeemed_before_its_deadline_whatever_it_is_worth(
    chain: ChainEnv, tmp_path: Path
) -> None:
    pay = payments(chain)
    store = _store(pay, tmp_path / "book.db")
    channel = _open(pay)
    latest = _serve(store, pay, channel, 3)  # 80 wei: dust
    config = RedeemerConfig(interval_s=3_600, close_check_s=0.2, min_worth_wei=10**18)
    service = RedeemerService(lambda: Redeemer(store, pay.with_account(dev_account(NODE)), config), config)
    task = asyncio.create_task(service.run())
    try:
        await _until(lambda: service.passed.is_set())  # the scheduled pass at start: dust waits
        assert pay.channel(channel).redeemed == 0  # type: ignore[union-attr]
        client = pay.with_account(dev_account(CLIENT))
        client.start_close(channel)
        closes_at = pay.channel(channel).closes_at  # type: ignore[union-attr]
        chain.advance(pay.dispute_delay() - 120)  # the node only notices two minutes before the deadline
        await _until(lambda: pay.channel(channel).redeemed == latest)  # type: ignore[union-attr]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert chain.now() < closes_at
    chain.advance(200)
    client.finish_close(channel)
    assert pay.balances(dev_account(CLIENT).address).withdrawable == DEPOSIT - latest  # only the rest
    assert pay.balances(dev_account(NODE).address).locked == latest


def test_closes_seen_while_down_are_redeemed_and_a_passed_deadline_is_reported_not_sent(
    chain: ChainEnv, tmp_path: Path
) -> None:
    pay = payments(chain)
    store = _store(pay, tmp_path / "book.db")
    late, soon = _open(pay), _open(pay, OTHER_CLIENT)
    _serve(store, pay, late, 2)
    latest = _serve(store, pay, soon, 2, client=OTHER_CLIENT)
    pay.with_account(dev_account(CLIENT)).start_close(late)
    chain.advance(pay.dispute_delay() // 2)
    pay.with_account(dev_account(OTHER_CLIENT)).start_close(soon)
    chain.advance(pay.dispute_delay() // 2 + 1)  # `late` is past its deadline, `soon` is not
    nonce = _nonce(chain)
    redeemer = _redeemer(chain, tmp_path / "book.db", RedeemerConfig(min_worth_wei=10**18))
    report = redeemer.redeem_closing()  # a fresh process: the closes are read from channel state
    assert report.lost == (late,) and report.channels == 1 and report.redeemed_wei == latest
    assert _nonce(chain) == nonce + 1  # nothing sent for the lost channel
    assert redeemer.redeem_closing().channels == 0 and _nonce(chain) == nonce + 1


def test_no_double_redeem_across_restarts_and_a_book_behind_the_chain_catches_up(
    chain: ChainEnv, tmp_path: Path
) -> None:
    pay = payments(chain)
    path = tmp_path / "book.db"
    channel = _open(pay)
    latest = _serve(_store(pay, path), pay, channel, 5)
    assert _redeemer(chain, path).claim().redeemed_wei == latest
    nonce = _nonce(chain)
    again = _redeemer(chain, path).claim()  # a restarted redeemer on the same file
    assert (again.channels, again.transactions, _nonce(chain)) == (0, (), nonce)

    # A process redeemed, then died before recording it: the next redeemer's estimate is refused as already
    # redeemed, the book catches up, and nothing is sent.
    latest = _serve(_store(pay, path), pay, channel, 5)
    pay.with_account(dev_account(NODE)).redeem(_store(pay, path).book(channel).latest)  # type: ignore[union-attr]
    nonce = _nonce(chain)
    report = _redeemer(chain, path).redeem_due()
    assert (report.caught_up, report.channels, _nonce(chain)) == (1, 0, nonce)
    assert _store(pay, path).book(channel).redeemed == latest  # type: ignore[union-attr]
    assert pay.channel(channel).redeemed == latest  # type: ignore[union-attr]


def test_dust_waits_until_it_is_worth_a_redeem(chain: ChainEnv, tmp_path: Path) -> None:
    pay = payments(chain)
    path = tmp_path / "book.db"
    store = _store(pay, path)
    dust, worth = _open(pay), _open(pay, OTHER_CLIENT)
    _serve(store, pay, dust, 3)  # 80 wei
    paid = _serve(store, pay, worth, 10, client=OTHER_CLIENT)  # 255 wei
    redeemer = _redeemer(chain, path, RedeemerConfig(min_worth_wei=200))
    report = redeemer.redeem_due()
    assert (report.channels, report.redeemed_wei) == (1, paid)
    assert pay.channel(dust).redeemed == 0  # type: ignore[union-attr]
    nonce = _nonce(chain)
    assert redeemer.redeem_due().channels == 0 and _nonce(chain) == nonce  # dust: no gas spent on it
    latest = _serve(store, pay, dust, 6)  # 230 wei
    assert redeemer.redeem_due().redeemed_wei == latest  # now worth it


def test_more_than_64_channels_are_split_into_batches(chain: ChainEnv) -> None:
    pay = payments(chain)
    # Opened from 8 threads (the nonce manager serialises only submission); the book in memory: this test is about
    # batching, the file-backed book is everywhere else.
    with ThreadPoolExecutor(8) as pool:
        channels = list(pool.map(lambda _i: _open(pay, deposit=100), range(65)))
    engine = create_engine("sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False})
    store = VoucherStore(engine, domain=pay.domain(), node=dev_account(NODE).address, channels=pay)
    for channel in channels:
        store.accept(voucher(pay, CLIENT, channel, 30), RULE)
    assert RedeemerConfig().batch_size == pay.max_batch() == 64
    report = Redeemer(store, pay.with_account(dev_account(NODE))).claim()
    assert [r.events.count("VoucherRedeemed") for r in report.transactions] == [64, 1]
    assert report.channels == 65 and report.redeemed_wei == 65 * 30
    assert pay.balances(dev_account(NODE).address).locked == 65 * 30


def test_an_unknown_outcome_is_looked_up_not_resent_and_never_loses_the_voucher(
    chain: ChainEnv, tmp_path: Path
) -> None:
    pay = payments(chain)
    path = tmp_path / "book.db"
    channel = _open(pay)
    latest = _serve(_store(pay, path), pay, channel, 4)
    redeemer = _redeemer(chain, path, receipt_timeout=0.3)
    rpc(chain.w3, "evm_setAutomine", [False])
    try:
        first = redeemer.redeem_due()  # sent, no receipt in time
        assert first.failed and first.channels == 0 and redeemer.stats.failures == {"outcome_unknown": 1}
        nonce = _nonce(chain)
        second = redeemer.redeem_due()  # still pending: looked up, not sent again
        assert second.channels == 0 and _nonce(chain) == nonce
        with pytest.raises(TransactionOutcomeUnknown):
            _redeemer(chain, path, receipt_timeout=0.3).claim()  # another process would resend: claim says so
        rpc(chain.w3, "evm_mine", [])
    finally:
        rpc(chain.w3, "evm_setAutomine", [True])
    third = redeemer.redeem_due()  # mined now: recorded, nothing new sent by this redeemer
    assert (third.channels, third.redeemed_wei, third.transactions) == (1, latest, ())
    assert _store(pay, path).book(channel).redeemed == latest  # type: ignore[union-attr]
    assert pay.channel(channel).redeemed == latest  # type: ignore[union-attr]


def test_a_jailed_node_stops_redeeming_says_so_and_resumes_after_unjail(
    chain: ChainEnv, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    setup = deploy_with_jail_switch(chain)
    pay = setup.payments
    path = tmp_path / "book.db"
    store = _store(pay, path)
    channel = _open(pay)
    latest = _serve(store, pay, channel, 10)
    redeemer = Redeemer(store, pay.with_account(dev_account(NODE)), FAST)
    setup.set_jailed(NODE, True)
    nonce = _nonce(chain)
    with caplog.at_level("ERROR", logger="node.overlay._redeemer"):
        report = redeemer.redeem_due()
        assert report.jailed and not report.failed and report.channels == 0
        redeemer.redeem_due()
    assert [r.message for r in caplog.records].count(
        "node jailed: redeeming stopped until the operator runs `ps-node unjail`"
    ) == 1  # said once
    with pytest.raises(PaymentChannelsNodeJailed):
        redeemer.claim()
    assert _nonce(chain) == nonce and store.book(channel).redeemed == 0  # type: ignore[union-attr]
    setup.set_jailed(NODE, False)
    report = redeemer.redeem_due()
    assert not report.jailed and report.redeemed_wei == latest and not redeemer.stats.jailed


async def test_the_service_retries_with_backoff_while_the_chain_is_down(chain: ChainEnv, tmp_path: Path) -> None:
    pay = payments(chain)
    store = _store(pay, tmp_path / "book.db")
    channel = _open(pay)
    latest = _serve(store, pay, channel, 5)
    attempts: list[float] = []

    def open_redeemer() -> Redeemer:
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            raise ChainNotReachable("http://127.0.0.1:1", "ConnectionError")
        if len(attempts) == 2:  # the book: `ps-node claim` in another process holds it past the busy timeout
            raise sqlite3.OperationalError("database is locked")
        return Redeemer(store, pay.with_account(dev_account(NODE)), FAST)

    service = RedeemerService(open_redeemer, FAST)
    task = asyncio.create_task(service.run())
    try:
        # The receipt, then the pass records it: wait for the record.
        await _until(lambda: service.redeemer is not None and service.redeemer.stats.transactions == 1)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert len(attempts) == 3 and gaps[0] >= 0.05 and gaps[1] >= 0.1  # doubling from backoff_initial_s
    assert pay.channel(channel).redeemed == latest  # type: ignore[union-attr]
    samples = {s.name: s.value for m in RedeemerCollector(service).collect() for s in m.samples if not s.labels}
    assert samples["planetserve_redeem_transactions_total"] == 1 and samples["planetserve_redeem_wei_total"] == latest


async def test_the_service_survives_a_voucher_book_locked_by_another_process_and_redeems_after(
    chain: ChainEnv, tmp_path: Path
) -> None:
    pay = payments(chain)
    path = tmp_path / "book.db"
    # The book as a second process (``ps-node claim``) sees it: SQLite's own file lock, a short busy timeout.
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.05})
    store = VoucherStore(engine, domain=pay.domain(), node=dev_account(NODE).address, channels=pay)
    channel = _open(pay)
    latest = _serve(store, pay, channel, 5)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # readers and writers of the book wait, then fail
    service = RedeemerService(lambda: Redeemer(store, pay.with_account(dev_account(NODE)), FAST), FAST)
    task = asyncio.create_task(service.run())
    try:
        await _until(lambda: service.redeemer is not None and sum(service.redeemer.stats.failures.values()) >= 2)
        assert not task.done()  # the pass failed, the service did not
        holder.execute("ROLLBACK")
        await _until(lambda: service.redeemer is not None and service.redeemer.stats.transactions == 1)
    finally:
        holder.close()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert pay.channel(channel).redeemed == latest  # type: ignore[union-attr]
    assert service.redeemer is not None and service.redeemer.stats.failures.get("OperationalError", 0) >= 2


async def test_the_service_survives_the_chain_failing_between_opening_and_reading_the_dispute_delay(
    chain: ChainEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pay = payments(chain)
    store = _store(pay, tmp_path / "book.db")
    channel = _open(pay)
    latest = _serve(store, pay, channel, 5)
    reads: list[float] = []
    period = Redeemer.close_check_period

    def flaky_period(self: Redeemer) -> float:
        reads.append(time.monotonic())
        if len(reads) == 1:  # the chain went away right after the redeemer was opened
            raise ChainNotReachable("http://127.0.0.1:1", "ConnectionError")
        return period(self)

    monkeypatch.setattr(Redeemer, "close_check_period", flaky_period)
    service = RedeemerService(lambda: Redeemer(store, pay.with_account(dev_account(NODE)), FAST), FAST)
    task = asyncio.create_task(service.run())
    try:
        await _until(lambda: service.redeemer is not None and service.redeemer.stats.transactions == 1)
        await asyncio.sleep(0.5)  # more passes: the service keeps its schedule
        assert not task.done()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert len(reads) == 2 and pay.channel(channel).redeemed == latest  # type: ignore[union-attr]


def test_the_configuration_is_validated() -> None:
    for bad in ({"batch_size": 65}, {"batch_size": 0}, {"min_worth_wei": 0}, {"interval_s": 0}, {"reorg_depth": -1}):
        with pytest.raises(InvalidChainInput):
            RedeemerConfig(**bad)


def _metrics(endpoint: str) -> str:
    with urllib.request.urlopen(f"{endpoint}/metrics", timeout=5) as response:
        return str(response.read().decode())


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def node_state(chain: ChainEnv, tmp_path: Path) -> Iterator[tuple[Path, int, int]]:
    """A model node's state directory whose voucher book holds paid requests on two channels, the last request
    of each accepted and never settled: the book a node killed mid-answer leaves. Yields (dir, channel, amount)."""
    pay = payments(chain)
    state = tmp_path / "node"
    state.mkdir(mode=0o700)
    store = _store(pay, state / f"vouchers-{chain.deployment.chain_id}.sqlite")
    first, second = _open(pay), _open(pay, OTHER_CLIENT)
    _serve(store, pay, first, 6)
    other = _serve(store, pay, second, 6, client=OTHER_CLIENT)
    last = store.accept(voucher(pay, CLIENT, first, 6 * 25 + 30), RULE)  # answered, then killed before settling
    yield state, first, last.voucher.cumulative_amount + other
    del store


def test_ps_node_serve_redeems_at_start_what_a_killed_node_served_and_shows_it_in_metrics(
    chain: ChainEnv,
    tiny_model_dir: Path,
    processes: list[subprocess.Popen[str]],
    node_state: tuple[Path, int, int],
) -> None:
    state, channel, total = node_state
    pay = payments(chain)
    env = cli_env(chain, state, NODE, PS_STATE_DIR=str(state), PS_REDEEM_INTERVAL="1", PS_REDEEM_MIN_WEI="1")
    args = ["serve", "--role", "model", "--engine", "torch", "--device", "cpu", "--model-dir", str(tiny_model_dir)]
    args += ["--port", "0", "--json"]
    nonce = _nonce(chain)
    processes.append(spawn_serve(args, env))
    endpoint = serve_ready(processes[-1])["endpoint"]
    deadline = time.monotonic() + 30
    while pay.balances(dev_account(NODE).address).locked != total:
        assert time.monotonic() < deadline, "the served node did not redeem its book"
        time.sleep(0.2)
    assert _nonce(chain) == nonce + 1  # both channels in one transaction
    assert pay.channel(channel).redeemed == 6 * 25 + 30  # type: ignore[union-attr]
    while "planetserve_redeem_unredeemed_wei 0.0" not in (metrics := _metrics(endpoint)):  # the pass's end
        assert time.monotonic() < deadline, metrics
        time.sleep(0.1)
    assert "planetserve_redeem_transactions_total 1.0" in metrics and "planetserve_redeem_jailed 0.0" in metrics
    assert f"planetserve_redeem_wei_total {total}.0" in metrics
    time.sleep(1.5)  # another scheduled pass: nothing sent twice
    assert _nonce(chain) == nonce + 1
    processes[-1].send_signal(signal.SIGTERM)
    assert processes[-1].wait(timeout=30) == 0


def test_ps_node_claim_on_a_jailed_node_fails_with_one_line_and_changes_nothing(
    chain: ChainEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pay = payments(chain)
    db = tmp_path / "book.db"
    channel = _open(pay)
    _serve(_store(pay, db), pay, channel, 3)
    registry = chain.registry(NODE)
    registry.register(
        role=Role.MODEL,
        endpoint="http://127.0.0.1:9",
        x25519_public_key=b"\x05" * 32,
        model_id=model_id("tiny-llama@v1"),
        price_per_1k_tokens=1_000,
        stake=TEST_PARAMS.minimum_stake_model,
    )
    registry.with_account(dev_account(OWNER)).grant_slasher(dev_account(SLASHER).address)
    registry.with_account(dev_account(SLASHER)).slash(dev_account(NODE).address, 1, b"\x09" * 32)
    env = cli_env(chain, tmp_path, NODE, PS_VOUCHERS_DB=f"sqlite:///{db}")
    failed = InProcess(monkeypatch, capsys)("node", ["claim"], env)
    assert_failed(failed, ExitCode.TX_REVERTED, "PaymentChannelsNodeJailed")
    assert pay.channel(channel).redeemed == 0 and _store(pay, db).book(channel).redeemed == 0  # type: ignore[union-attr]
