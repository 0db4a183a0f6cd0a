"""The client's durable wallet (``node.client._wallet`` + ``_wallet_store``) and ``ps-client deposit|channels|close|
reclaim``, against a real anvil; the live tests pay a real model node (tiny torch model behind a ``PaymentGate`` and
its SQLite voucher store) over six real relays on 127.0.0.1, from this process and from separate client processes
(``tests/wallet_payer.py``).

What is proven: later processes continue a channel's cumulative amount from the book, two of them paying one node
at once share that one channel, and the node accepts every voucher (none stale, none underpaid), the books agreeing
with the node's; a process killed right after committing a voucher leaves its
reservation counted as spent, and the next voucher is accepted; a deposit whose transaction left before the book
recorded it is found again by its event; a book of another chain (same id, other genesis) is not reused; fresh
addresses pay from a derived key; the CLI's amounts are exact to the wei, and its errors are one line.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cli.exit_codes import ExitCode
from ledger import Role, Voucher, dev_account, model_id, sign_voucher
from node.client import Client, ClientConfig
from node.client._wallet import Wallet, derive_channel_account
from node.client._wallet_store import ChannelLocks, WalletStore
from node.overlay import CompletionRequest, ModelNode
from planetserve import ModelId
from tests.fixtures.chain import ChainEnv
from tests.fixtures.payments import eth_balance, payments
from tests.test_chain_cli import InProcess, _env, _failed, _ok_json, _run
from tests.test_payments_overlay import CLIENT, NODE, PRICE, PROMPTS, PaidNet, _request, _start

PAYER = Path(__file__).parent / "wallet_payer.py"
DEPOSIT = 10**14
BUDGET = 10**15


def _wallet(chain: ChainEnv, state: Path, index: int = CLIENT) -> Wallet:
    return Wallet(payments(chain), dev_account(index), budget_wei=BUDGET, deposit_wei=DEPOSIT, state_dir=state)


def _unreached_node() -> tuple[ModelNode, CompletionRequest]:
    """A paid model node nothing is sent to (the wallet tests that stop at the voucher) and a request for it."""
    node = ModelNode(
        operator=dev_account(NODE).address,
        endpoint="http://127.0.0.1:9",
        public_key=bytes(32),
        model_id=ModelId.of("tiny-llama@v1"),
        price_per_1k_tokens=PRICE,
    )
    return node, CompletionRequest(model=node.model_id, prompt="hello", max_tokens=4)


def _job(chain: ChainEnv, paid: PaidNet, state: Path, prompts: list[str], **extra: Any) -> dict[str, Any]:
    node = paid.served()
    return {
        "rpc_url": chain.rpc_url,
        "payments": chain.deployment.payments_address,
        "state_dir": str(state),
        "budget_wei": str(BUDGET),
        "deposit_wei": str(DEPOSIT),
        "max_tokens": 4,
        "prompts": prompts,
        "node": {
            "operator": node.operator,
            "endpoint": node.endpoint,
            "public_key": node.public_key.hex(),
            "model_id": str(node.model_id),
            "price": str(PRICE),
        },
        "relays": [
            {"node_id": r.node_id, "operator": r.operator, "endpoint": r.endpoint, "key": r.public_key.hex()}
            for r in paid.net.descriptors()
        ],
        **extra,
    }


async def _spawn(job: dict[str, Any]) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PS_")}
    env["PS_PRIVATE_KEY"] = dev_account(CLIENT).key.hex()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(PAYER),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    assert process.stdin is not None
    process.stdin.write(json.dumps(job).encode())
    process.stdin.close()
    return process


async def _result(process: asyncio.subprocess.Process) -> dict[str, Any]:
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()[-2000:]
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


def _agrees_with_node(paid: PaidNet, wallet: Wallet) -> int:
    """The single channel's book equals the node's (latest voucher and owed); returns its id."""
    (state,) = wallet.channels()
    book = paid.store.book(state.channel_id)
    assert book is not None
    assert (book.latest.cumulative_amount, book.owed, book.reserved) == (state.last, state.owed, 0)
    assert state.in_flight == 0
    return state.channel_id


async def test_two_later_processes_continue_the_channel_at_once_and_the_node_accepts_every_voucher(
    chain: ChainEnv, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """This process pays first and stops; then two client processes at once continue from its book: each voucher
    they sign is above every earlier one and reaches the node in order (none stale, none underpaid)."""
    paid = await _start(chain, tiny_model_dir, tmp_path / "vouchers.db")
    state = tmp_path / "client"
    try:
        first = _wallet(chain, state)
        async with Client(paid.directory(), ClientConfig(heartbeats=False, attempts=1), wallet=first) as client:
            await client.complete(_request(paid, PROMPTS[0]))
        (before,) = first.channels()
        first.close()
        processes = [await _spawn(_job(chain, paid, state, list(PROMPTS[i : i + 2]))) for i in (1, 2)]
        results = [await _result(p) for p in processes]
        outcomes = [r for result in results for r in result["results"]]
        assert len(outcomes) == 4 and all("error" not in r for r in outcomes), outcomes
        assert paid.engine.generated == 5
        again = _wallet(chain, state)
        channel_id = _agrees_with_node(paid, again)
        (after,) = again.channels()
        assert channel_id == before.channel_id and after.last > before.last and after.owed > before.owed
        assert payments(chain).next_channel_id() == channel_id + 1  # no second channel was opened
        again.close()
    finally:
        await paid.close()


async def test_a_crash_after_signing_counts_the_reservation_as_spent_and_the_next_voucher_is_accepted(
    chain: ChainEnv, tiny_model_dir: Path, tmp_path: Path
) -> None:
    paid = await _start(chain, tiny_model_dir, tmp_path / "vouchers.db")
    state = tmp_path / "client"
    try:
        died = await _result(await _spawn(_job(chain, paid, state, [PROMPTS[0]], die_after_signing=True)))
        signed, reservation = int(died["signed"]), int(died["reservation"])
        wallet = _wallet(chain, state)  # alone now: the dead process's reservation is folded into owed
        (channel,) = wallet.channels()
        assert (channel.last, channel.owed, channel.in_flight) == (signed, reservation, 0)
        async with Client(paid.directory(), ClientConfig(heartbeats=False, attempts=1), wallet=wallet) as client:
            await client.complete(_request(paid, PROMPTS[1]))
        assert paid.engine.generated == 1
        book = paid.store.book(channel.channel_id)
        assert book is not None and book.latest.cumulative_amount == wallet.channels()[0].last > signed
        wallet.close()
    finally:
        await paid.close()


async def test_no_voucher_is_signed_while_another_process_holds_the_nodes_lock(chain: ChainEnv, tmp_path: Path) -> None:
    """``flock`` locks of two open files conflict exactly as two processes' do: the other "process" here is a second
    ``ChannelLocks`` on the same folder, holding the node's lock as a request in transit would."""
    wallet = _wallet(chain, tmp_path)
    node, request = _unreached_node()
    prefix = next(p.name.rsplit("-", 2)[0] for p in (tmp_path / "locks").iterdir() if p.name.endswith("-wallet.lock"))
    other = ChannelLocks(tmp_path / "locks", prefix)
    assert other.try_acquire(node.operator)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(wallet.pay(node, request, None), 0.5)
    assert wallet.channels() == []  # nothing was signed, nor opened, while it waited
    other.release(node.operator)
    _paid, payment = await asyncio.wait_for(wallet.pay(node, request, None), 30)
    assert payment is not None and not other.try_acquire(node.operator)  # now this wallet holds it until admitted
    wallet.finish(payment, 0)
    assert other.try_acquire(node.operator)
    other.close()
    wallet.close()


def _hold_write_lock(path: Path, seconds: float) -> threading.Timer:
    """Another process's write transaction on the wallet's book (SQLite's own lock), released after ``seconds``
    from a timer thread (the event loop may be the one stuck)."""
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")

    def release() -> None:
        holder.execute("ROLLBACK")
        holder.close()

    timer = threading.Timer(seconds, release)
    timer.start()
    return timer


async def _loop_stall(until: asyncio.Future[Any]) -> float:
    """The longest the event loop went without running this coroutine while ``until`` was pending, seconds."""
    worst, last = 0.0, time.monotonic()
    while not until.done():
        await asyncio.sleep(0.01)
        now = time.monotonic()
        worst, last = max(worst, now - last), now
    return worst


async def test_a_voucher_waiting_for_the_books_write_lock_does_not_stall_the_event_loop(
    chain: ChainEnv, tmp_path: Path
) -> None:
    wallet = _wallet(chain, tmp_path)
    node, request = _unreached_node()
    _paid, first = await wallet.pay(node, request, None)  # opens the channel
    assert first is not None
    wallet.finish(first, 0)
    timer = _hold_write_lock(wallet.store.path, 1.0)
    paying = asyncio.ensure_future(wallet.pay(node, request, None))
    stall = await _loop_stall(paying)
    _paid, second = await paying
    timer.join()
    assert second is not None and second.amount > first.amount
    assert stall < 0.5  # the 1 s wait for the lock happened in a worker thread
    wallet.finish(second, 0)
    wallet.close()


async def test_a_payment_cancelled_while_its_voucher_is_committed_leaves_no_reservation(
    chain: ChainEnv, tmp_path: Path
) -> None:
    """A request timeout can cancel ``pay`` after the book committed the voucher's amount but before the voucher
    exists; its reservation must not stay in flight, or every later voucher on the channel is that much too high."""
    wallet = _wallet(chain, tmp_path)
    node, request = _unreached_node()
    _paid, first = await wallet.pay(node, request, None)
    assert first is not None
    wallet.finish(first, 0)
    timer = _hold_write_lock(wallet.store.path, 0.6)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(wallet.pay(node, request, None), 0.2)
    await asyncio.to_thread(timer.join)
    deadline = time.monotonic() + 15
    while (state := wallet.channels()[0]).in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert state.in_flight == 0 and state.owed == 0
    _paid, third = await wallet.pay(node, request, None)  # the next voucher is the usual step above the last one
    assert third is not None and third.amount == max(state.last + 1, third.reservation)
    wallet.finish(third, 0)
    wallet.close()


def test_a_wallet_alone_folds_dead_reservations_before_another_process_can_join(
    chain: ChainEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Folding while another process has already joined would count that live process's reservation as spent (its
    later vouchers would pay the node that much more): the fold runs while the wallet lock is still exclusive."""
    could_join: list[bool] = []
    fold = WalletStore.fold_in_flight

    def checked_fold(store: WalletStore) -> int:
        (lock,) = (tmp_path / "locks").glob("*-wallet.lock")
        fd = os.open(lock, os.O_RDWR)  # another process joining: a shared lock on its own open file
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            could_join.append(True)
        except BlockingIOError:
            could_join.append(False)
        finally:
            os.close(fd)
        return fold(store)

    monkeypatch.setattr(WalletStore, "fold_in_flight", checked_fold)
    wallet = _wallet(chain, tmp_path)
    assert could_join == [False]
    second = _wallet(chain, tmp_path)  # not alone: it folds nothing
    assert could_join == [False]
    second.close()
    wallet.close()


async def test_a_wallet_on_fresh_addresses_opens_and_signs_from_a_derived_key(chain: ChainEnv, tmp_path: Path) -> None:
    wallet = Wallet(
        payments(chain),
        dev_account(CLIENT),
        budget_wei=BUDGET,
        deposit_wei=DEPOSIT,
        state_dir=tmp_path,
        fresh_addresses=True,
    )
    node, request = _unreached_node()
    paid, payment = await wallet.pay(node, request, None)
    assert payment is not None and paid.voucher is not None
    wallet.finish(payment, 0)
    (state,) = wallet.channels()
    info = payments(chain).channel(state.channel_id)
    signer = payments(chain).voucher_signer(Voucher.from_json(paid.voucher.to_json()))
    assert info is not None and info.client == signer == wallet.signer_address(state) != wallet.address
    wallet.close()


async def test_a_channel_another_process_closed_is_not_paid_on_again(chain: ChainEnv, tmp_path: Path) -> None:
    running = Wallet(
        payments(chain),
        dev_account(CLIENT),
        budget_wei=BUDGET,
        deposit_wei=DEPOSIT,
        state_dir=tmp_path,
        chain_check_s=0,
    )
    node, request = _unreached_node()
    _paid, first = await running.pay(node, request, None)
    assert first is not None
    running.finish(first, 0)
    other = _wallet(chain, tmp_path)  # `ps-client close` in another process, while this one keeps running
    other.start_close(node=node.operator)
    other.close()
    _paid, second = await running.pay(node, request, None)
    assert second is not None and second.channel_id != first.channel_id
    running.finish(second, 0)
    assert {c.channel_id: c.state for c in running.channels()} == {
        first.channel_id: "closing",
        second.channel_id: "open",
    }
    running.close()


def test_a_deposit_sent_before_the_book_recorded_it_is_found_again(chain: ChainEnv, tmp_path: Path) -> None:
    wallet = _wallet(chain, tmp_path)
    node = dev_account(NODE).address
    pending = wallet.store.reserve_deposit(node, DEPOSIT, from_block=chain.w3.eth.block_number, budget=None)
    assert pending is not None
    opened = payments(chain, CLIENT).open_channel(node, DEPOSIT)  # "crash" here: the book never heard of it
    assert wallet.channels() == [] and wallet.store.committed_deposits() == DEPOSIT  # the budget still counts it
    wallet.close()
    again = _wallet(chain, tmp_path)
    (state,) = again.channels()
    assert (state.channel_id, state.node, state.deposit, state.state) == (opened.channel_id, node, DEPOSIT, "open")
    assert again.store.pending() == []
    again.close()


def test_a_book_of_another_chain_with_the_same_id_is_not_reused(chain: ChainEnv, tmp_path: Path) -> None:
    contract, client = chain.deployment.payments_address, dev_account(CLIENT).address
    old = WalletStore(tmp_path / "wallet.sqlite", genesis="0x" + "11" * 32, contract=contract, client=client)
    old.record_channel(channel_id=1, node=dev_account(NODE).address, deposit=5)
    new = WalletStore(tmp_path / "wallet.sqlite", genesis="0x" + "22" * 32, contract=contract, client=client)
    assert [c.channel_id for c in old.channels()] == [1] and new.channels() == []
    old.close()
    new.close()


def test_a_fresh_address_channel_is_paid_and_refunded_away_from_the_main_address(
    chain: ChainEnv, tmp_path: Path
) -> None:
    wallet = _wallet(chain, tmp_path)
    node = dev_account(NODE).address
    state = wallet.deposit(node, DEPOSIT, fresh=True)
    fresh = wallet.signer_address(state)
    domain = payments(chain).domain()
    expected = derive_channel_account(
        dev_account(CLIENT), chain_id=domain.chain_id, contract=domain.contract, node=node, index=0
    )
    info = payments(chain).channel(state.channel_id)
    assert info is not None and info.client == fresh == expected.address != wallet.address
    # Its vouchers are the fresh key's, and the contract pays them.
    payments(chain, NODE).redeem(sign_voucher(expected, domain, state.channel_id, 1_000))
    closed = wallet.start_close(node=node)
    assert [c.state for c, _ in closed] == ["closing"]
    chain.advance(payments(chain).dispute_delay() + 1)
    before = chain.w3.eth.get_balance(expected.address)
    done = wallet.reclaim(chain.now())
    assert done.settled == (state.channel_id,) and done.withdrawn_wei == DEPOSIT - 1_000
    fees = sum(r.gas_used * r.effective_gas_price for r in done.receipts)
    assert chain.w3.eth.get_balance(expected.address) == before + DEPOSIT - 1_000 - fees
    wallet.close()


# -- the CLI, as separate processes -------------------------------------------------------------------------------


def _register_model_node(chain: ChainEnv) -> str:
    chain.registry(NODE).register(
        role=Role.MODEL,
        endpoint="http://127.0.0.1:9001",
        x25519_public_key=bytes(range(1, 33)),
        model_id=model_id("tiny-llama@v1"),
        price_per_1k_tokens=PRICE,
        stake=10**18,
    )
    return str(dev_account(NODE).address)


def _last_fee(chain: ChainEnv) -> int:
    """Gas paid by the transaction in the latest block (anvil mines one per block)."""
    block = chain.w3.eth.get_block("latest")
    (tx_hash,) = block["transactions"]
    receipt = chain.w3.eth.get_transaction_receipt(tx_hash)  # type: ignore[arg-type]
    return int(receipt["gasUsed"]) * int(receipt["effectiveGasPrice"])


def _client_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return _run("client", args, env)


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> InProcess:
    return InProcess(monkeypatch, capsys)


def test_deposit_channels_close_and_reclaim_through_the_cli_are_exact_to_the_wei(
    chain: ChainEnv, tmp_path: Path, in_process: InProcess
) -> None:
    """The first and the last step run as separate processes (the last finds the book the others left); the rest in
    this process through the same ``main()`` (a CLI start costs seconds on a loaded machine)."""
    node = _register_model_node(chain)
    env = _env(chain, tmp_path, key_index=CLIENT, PS_STATE_DIR=str(tmp_path / "client"))
    contract = chain.deployment.payments_address
    start, held = eth_balance(chain.w3, CLIENT), chain.w3.eth.get_balance(contract)

    opened = _ok_json(_client_cli(["deposit", "--node", node, "--eth", "0.000123", "--json"], env))
    fee_open = _last_fee(chain)
    topped = _ok_json(in_process("client", ["deposit", "--node", node, "--eth", "0.000000000000000077", "--json"], env))
    fee_top = _last_fee(chain)
    deposit = 123 * 10**12 + 77
    assert (opened["action"], topped["action"]) == ("opened", "topped up")
    assert topped["channel_id"] == opened["channel_id"] and topped["deposit_wei"] == str(deposit)
    assert eth_balance(chain.w3, CLIENT) == start - deposit - fee_open - fee_top
    assert chain.w3.eth.get_balance(contract) == held + deposit

    # The node redeems a voucher the client signed: `channels` reconciles it from the chain.
    channel_id = int(opened["channel_id"])
    pay = payments(chain)
    payments(chain, NODE).redeem(sign_voucher(dev_account(CLIENT), pay.domain(), channel_id, 5_000))
    (row,) = _ok_json(in_process("client", ["channels", "--json"], env))["channels"]
    assert (row["deposit_wei"], row["redeemed_wei"], row["signed_wei"], row["state"]) == (
        str(deposit),
        "5000",
        "5000",
        "open",
    )
    assert row["left_wei"] == str(deposit - 5_000) and row["deposit_eth"] == "0.000123000000000077"

    (closing,) = _ok_json(in_process("client", ["close", "--node", node, "--json"], env))["closing"]
    fee_close = _last_fee(chain)
    assert closing["state"] == "closing" and closing["closes_at"] == chain.now() + pay.dispute_delay()
    early = _ok_json(in_process("client", ["reclaim", "--json"], env))
    assert early["settled"] == [] and early["withdrawn_wei"] == "0" and str(channel_id) in early["still_closing"]

    chain.advance(pay.dispute_delay() + 1)
    before = eth_balance(chain.w3, CLIENT)
    done = _ok_json(_client_cli(["reclaim", "--json"], env))
    assert done["settled"] == [channel_id] and done["withdrawn_wei"] == str(deposit - 5_000)
    fees = 0
    for tx_hash in done["tx_hashes"]:
        receipt = chain.w3.eth.get_transaction_receipt(tx_hash)
        fees += int(receipt["gasUsed"]) * int(receipt["effectiveGasPrice"])
    assert eth_balance(chain.w3, CLIENT) == before + deposit - 5_000 - fees
    assert eth_balance(chain.w3, CLIENT) == start - 5_000 - fee_open - fee_top - fee_close - fees
    assert _ok_json(in_process("client", ["channels", "--json"], env))["channels"] == []
    (settled,) = _ok_json(in_process("client", ["channels", "--all", "--json"], env))["channels"]
    assert settled["state"] == "settled"


def test_cli_wallet_errors_are_one_line_with_their_exit_code(
    chain: ChainEnv, tmp_path: Path, in_process: InProcess
) -> None:
    node = _register_model_node(chain)
    env = _env(chain, tmp_path, key_index=CLIENT, PS_STATE_DIR=str(tmp_path / "client"))
    stranger = dev_account(17).address
    _failed(_client_cli(["deposit", "--node", stranger, "--eth", "0.01"], env), ExitCode.INVALID_INPUT, "model node")
    _failed(in_process("client", ["deposit", "--node", node, "--eth", "100000"], env), ExitCode.INSUFFICIENT_FUNDS)
    _failed(in_process("client", ["deposit", "--node", node, "--eth", "0"], env), ExitCode.INVALID_INPUT, "eth")
    _failed(in_process("client", ["close", "--node", node], env), ExitCode.INVALID_INPUT, "no channel")
    usage = in_process("client", ["close"], env)
    assert usage.returncode == ExitCode.USAGE and "--node ADDR or --all" in usage.stderr
    no_key = {k: v for k, v in env.items() if k != "PS_PRIVATE_KEY"}
    _failed(in_process("client", ["channels"], no_key), ExitCode.KEY_ERROR, "PS_PRIVATE_KEY")
