"""The wallet's book runs on one ordered thread (``node.client._book_queue``), against a real anvil and the real
SQLite book: a voucher signed right after a finish sees that request settled, many concurrent requests over several
channels leave the books exact to the wei, a request cancelled while its voucher waits in the queue leaves no
reservation, nothing queued is lost at ``close()`` (nor when a wallet is dropped unclosed), a failing write is logged
and raised, and ``finish`` returns at once while another process holds the book's write lock.

The slow or failing ``settle`` below stands in for the book's own disk (its direct neighbour): it delays or breaks the
real write, so that an unordered executor, or a settle on the caller's thread, would show.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ledger import dev_account
from node.client._wallet import BookWriteFailed, Payment, Wallet, cost
from node.client._wallet_store import WalletStore
from node.overlay import CompletionRequest, ModelNode
from planetserve import ModelId
from tests.fixtures.chain import ChainEnv
from tests.fixtures.payments import NODES
from tests.test_client_wallet import _hold_write_lock, _loop_stall, _unreached_node, _wallet
from tests.test_payments_overlay import PRICE


def _slowed(store: WalletStore, seconds: float) -> Callable[[int, int, int], None]:
    real = store.settle

    def settle(channel_id: int, reservation: int, spent: int) -> None:
        time.sleep(seconds)  # on the book's thread: everything queued after it waits
        real(channel_id, reservation, spent)

    return settle


async def _paid(wallet: Wallet, node: ModelNode, request: CompletionRequest) -> Payment:
    _request, payment = await wallet.pay(node, request, None)
    assert payment is not None
    wallet.admitted(payment)
    return payment


async def test_a_voucher_signed_right_after_a_finish_sees_that_request_settled(
    chain: ChainEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wallet = _wallet(chain, tmp_path)
    node, request = _unreached_node()
    first = await _paid(wallet, node, request)
    monkeypatch.setattr(wallet.store, "settle", _slowed(wallet.store, 0.4))
    started = time.monotonic()
    wallet.finish(first, 3)
    assert time.monotonic() - started < 0.3  # queued, not written on the caller's thread (that takes 0.4 s)
    second = await _paid(wallet, node, request)
    # Signed before the settle, it would cover the first request's whole reservation again (2 x reservation).
    assert second.amount == max(first.amount + 1, cost(PRICE, 3) + second.reservation)
    assert second.amount < first.reservation + second.reservation
    wallet.finish(second, 0)
    await wallet.drain()
    (state,) = wallet.channels()
    assert (state.owed, state.in_flight, state.last) == (cost(PRICE, 3), 0, second.amount)
    wallet.close()


async def test_many_concurrent_requests_on_several_channels_keep_the_books_exact_to_the_wei(
    chain: ChainEnv, tmp_path: Path
) -> None:
    wallet = _wallet(chain, tmp_path)
    nodes = [
        ModelNode(
            operator=dev_account(i).address,
            endpoint="http://127.0.0.1:9",
            public_key=bytes(32),
            model_id=ModelId.of("tiny-llama@v1"),
            price_per_1k_tokens=PRICE,
        )
        for i in NODES[:3]
    ]
    request = CompletionRequest(model=nodes[0].model_id, prompt="hello", max_tokens=4)
    rng = random.Random(11)
    owed: dict[int, int] = {}
    signed: dict[int, list[int]] = {}

    async def one(i: int) -> None:
        node = nodes[i % len(nodes)]
        used = rng.choice([None, 0, 1, 5, 13])  # None: the reply broke after the node had it (whole reservation)
        payment = await _paid(wallet, node, request)
        signed.setdefault(payment.channel_id, []).append(payment.amount)
        await asyncio.sleep(rng.random() * 0.02)
        wallet.finish(payment, used)
        spent = payment.reservation if used is None else cost(PRICE, used)
        owed[payment.channel_id] = owed.get(payment.channel_id, 0) + spent

    await asyncio.gather(*(one(i) for i in range(36)))
    await wallet.drain()
    states = wallet.channels()
    assert len(states) == 3 and sum(len(v) for v in signed.values()) == 36
    for state in states:
        amounts = signed[state.channel_id]
        assert amounts == sorted(set(amounts))  # every voucher above the one before, in signing order
        assert (state.owed, state.in_flight, state.last) == (owed[state.channel_id], 0, amounts[-1])
    wallet.close()


async def test_a_request_cancelled_while_its_voucher_waits_in_the_queue_leaves_no_reservation(
    chain: ChainEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wallet = _wallet(chain, tmp_path)
    node, request = _unreached_node()
    first = await _paid(wallet, node, request)
    monkeypatch.setattr(wallet.store, "settle", _slowed(wallet.store, 0.5))
    wallet.finish(first, 2)
    with pytest.raises(TimeoutError):  # a request timeout while its voucher is queued behind the slow settle
        await asyncio.wait_for(wallet.pay(node, request, None), 0.1)
    await wallet.drain()
    (state,) = wallet.channels()
    assert (state.owed, state.in_flight) == (cost(PRICE, 2), 0)
    third = await _paid(wallet, node, request)  # the next voucher is the usual step above the last one
    assert third.amount == max(state.last + 1, state.owed + third.reservation)
    wallet.finish(third, 0)
    wallet.close()


async def test_close_runs_every_queued_write_before_letting_go_of_the_book(
    chain: ChainEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wallet = _wallet(chain, tmp_path)
    node, request = _unreached_node()
    payment = await _paid(wallet, node, request)
    monkeypatch.setattr(wallet.store, "settle", _slowed(wallet.store, 0.3))
    wallet.finish(payment, 7)
    wallet.close()  # right away: the settle is still queued
    again = _wallet(chain, tmp_path)
    (state,) = again.channels()
    assert (state.owed, state.in_flight) == (cost(PRICE, 7), 0)
    again.close()


async def test_a_failing_book_write_is_logged_and_raised_by_drain(
    chain: ChainEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    wallet = _wallet(chain, tmp_path)
    node, request = _unreached_node()
    payment = await _paid(wallet, node, request)

    def broken(channel_id: int, reservation: int, spent: int) -> None:
        raise OSError("disk I/O error")

    monkeypatch.setattr(wallet.store, "settle", broken)
    with caplog.at_level(logging.ERROR, logger="node.client._book_queue"):
        wallet.finish(payment, 1)  # returns: the caller (a generator's finally) is not the place to raise
        with pytest.raises(BookWriteFailed) as failed:
            await wallet.drain()
    assert failed.value.failed == 1 and isinstance(failed.value.first, OSError)
    assert any("settle" in r.getMessage() and "OSError" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()
    wallet.close()  # the failure was handed on once: closing is clean


async def test_a_failing_queued_write_makes_close_raise(
    chain: ChainEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wallet = _wallet(chain, tmp_path)
    node, request = _unreached_node()
    payment = await _paid(wallet, node, request)

    def broken(channel_id: int, reservation: int, spent: int) -> None:
        raise OSError("disk I/O error")

    monkeypatch.setattr(wallet.store, "settle", broken)
    wallet.finish(payment, 1)
    with pytest.raises(BookWriteFailed):
        wallet.close()
    wallet.close()  # idempotent


async def test_finish_returns_at_once_while_another_process_holds_the_books_write_lock(
    chain: ChainEnv, tmp_path: Path
) -> None:
    wallet = _wallet(chain, tmp_path)
    node, request = _unreached_node()
    payment = await _paid(wallet, node, request)
    timer = _hold_write_lock(wallet.store.path, 1.5)
    started = time.monotonic()
    wallet.finish(payment, 4)
    returned = time.monotonic() - started
    draining = asyncio.ensure_future(wallet.drain())
    stall = await _loop_stall(draining)
    await draining
    await asyncio.to_thread(timer.join)
    assert returned < 0.3 and stall < 0.75  # the 1.5 s wait for the lock happened on the book's thread
    (state,) = wallet.channels()
    assert (state.owed, state.in_flight) == (cost(PRICE, 4), 0)
    wallet.close()


async def test_a_wallet_dropped_without_close_writes_its_queue_and_stops_its_thread(
    chain: ChainEnv, tmp_path: Path
) -> None:
    wallet = _wallet(chain, tmp_path)
    node, request = _unreached_node()
    payment = await _paid(wallet, node, request)
    wallet.finish(payment, 6)
    name = f"ps-wallet-book-{wallet.address[:10]}"
    del wallet, payment
    gc.collect()  # the finalizer drains the queue, then stops the book's thread
    deadline = time.monotonic() + 10
    while any(t.name == name for t in threading.enumerate()) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert not any(t.name == name for t in threading.enumerate())
    again = _wallet(chain, tmp_path)
    (state,) = again.channels()
    assert (state.owed, state.in_flight) == (cost(PRICE, 6), 0)
    again.close()
