"""How long the client wallet's book stalls the event loop while many paid requests settle.

Why: an OpenAI endpoint runs every request of a client on one event loop; a book write done on that loop (an SQLite
commit with an fsync, ~12 ms) delays every other request's deltas by as much. This runs ``concurrency`` requests at a
time through a real :class:`node.client._wallet.Wallet` (anvil, the deployed ``PaymentChannels``, the SQLite book in a
temporary state directory): each one pays (``pay``), is admitted, "streams" for ``stream_ms`` and finishes
(``finish``) — the same calls the ``Client`` makes — spread over ``nodes`` model nodes (one channel each, opened
before the measurement). Meanwhile a ticker sleeps 1 ms at a time and records how late it wakes up (the loop
lag). ``--other-writer-ms`` adds another process of the same client that holds the book's write lock that long
every 250 ms.

Prints and writes (``bench/results/wallet_loop.json``, merged by ``--label``): the longest and the 99th-percentile
loop lag, the same for the ticker alone first (``--idle-s``: what the loaded machine itself adds), the longest
``finish()`` call on the loop, requests per second, and the book's totals checked against the sum of what each
request was charged (exact to the wei).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sqlite3
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ledger import Anvil, AnvilConfig, PaymentChannels, RegistryParams, deploy_all, dev_account
from node.client._wallet import Wallet, cost
from node.overlay import CompletionRequest, ModelNode
from planetserve import ModelId

RESULTS = Path(__file__).resolve().parent / "results" / "wallet_loop.json"
PRICE = 1_000_001
CLIENT = 10


async def _measure(
    wallet: Wallet,
    nodes: list[ModelNode],
    *,
    requests: int,
    concurrency: int,
    stream_ms: float,
    idle_s: float,
    other_writer_ms: float,
) -> dict[str, Any]:
    rng = random.Random(7)
    request = CompletionRequest(model=nodes[0].model_id, prompt="12+07=", max_tokens=8)
    charged: dict[int, int] = {}
    finish_s: list[float] = []
    for node in nodes:  # open every channel first: the measurement is the request path, not deposits
        _paid, payment = await wallet.pay(node, request, 6)
        assert payment is not None
        wallet.admitted(payment)
        wallet.finish(payment, 0)
    lags: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - before - 0.001)

    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        node = nodes[i % len(nodes)]
        used = rng.randint(1, 14)
        try:
            _paid, payment = await wallet.pay(node, request, 6)
            assert payment is not None
            wallet.admitted(payment)
            await asyncio.sleep(stream_ms / 1000)
            started = time.perf_counter()
            wallet.finish(payment, used)
            finish_s.append(time.perf_counter() - started)
            charged[payment.channel_id] = charged.get(payment.channel_id, 0) + cost(PRICE, used)
        finally:
            gate.release()

    async def arrivals() -> None:
        # A request starts when a slot frees (as an endpoint's callers would send them), not 200 tasks at once.
        running = []
        for i in range(requests):
            await gate.acquire()
            running.append(asyncio.ensure_future(one(i)))
        await asyncio.gather(*running)

    tick = asyncio.ensure_future(ticker())
    await asyncio.sleep(idle_s)  # the machine's own noise first: the ticker alone, no wallet work
    done.set()
    await tick
    idle = sorted(lags)
    lags.clear()
    done.clear()
    stop_other = threading.Event()
    other = threading.Thread(target=_other_writer, args=(wallet.store.path, other_writer_ms, stop_other), daemon=True)
    if other_writer_ms > 0:
        other.start()
    tick = asyncio.ensure_future(ticker())
    started = time.perf_counter()
    await arrivals()
    elapsed = time.perf_counter() - started
    done.set()
    await tick
    stop_other.set()
    if other.is_alive():
        other.join(5)
    drain = getattr(wallet, "drain", None)
    if drain is not None:
        await drain()
    exact = all(
        c.owed == charged.get(c.channel_id, 0) and c.in_flight == 0
        for c in wallet.channels()
        if c.channel_id in charged
    )
    lags.sort()
    return {
        "requests": requests,
        "concurrency": concurrency,
        "nodes": len(nodes),
        "stream_ms": stream_ms,
        "other_writer_ms": other_writer_ms,
        "idle_s": idle_s,
        "idle_loop_lag_max_ms": round(1000 * idle[-1], 2),
        "idle_loop_lag_p99_ms": round(1000 * idle[int(0.99 * (len(idle) - 1))], 2),
        "idle_lags_over_20ms": sum(1 for lag in idle if lag > 0.020),
        "loop_lag_max_ms": round(1000 * lags[-1], 2),
        "loop_lag_p99_ms": round(1000 * lags[int(0.99 * (len(lags) - 1))], 2),
        "loop_lag_median_ms": round(1000 * statistics.median(lags), 3),
        "lags_over_20ms": sum(1 for lag in lags if lag > 0.020),
        "lags_over_50ms": sum(1 for lag in lags if lag > 0.050),
        "loop_lag_total_ms": round(1000 * sum(lags), 1),
        "finish_call_max_ms": round(1000 * max(finish_s), 2),
        "finish_call_median_ms": round(1000 * statistics.median(finish_s), 3),
        "requests_per_s": round(requests / elapsed, 1),
        "books_exact_to_the_wei": exact,
    }


def _other_writer(path: Path, hold_ms: float, stop: threading.Event) -> None:
    """Another process of the same client writing its book (``ps-client ask`` beside the endpoint): holds SQLite's
    write lock ``hold_ms`` every 250 ms."""
    holder = sqlite3.connect(path, isolation_level=None, timeout=10)
    try:
        while not stop.wait(0.25):
            holder.execute("BEGIN IMMEDIATE")
            time.sleep(hold_ms / 1000)
            holder.execute("ROLLBACK")
    finally:
        holder.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="current", help="Key of this run in the JSON (e.g. before/after).")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--stream-ms", type=float, default=20.0)
    parser.add_argument(
        "--other-writer-ms",
        type=float,
        default=0.0,
        help="Another process of the client holding the book's write lock this long every 250 ms (0: none).",
    )
    parser.add_argument("--idle-s", type=float, default=2.0, help="Seconds of ticker alone first (machine noise).")
    args = parser.parse_args()
    with Anvil(AnvilConfig(accounts=20)) as anvil, tempfile.TemporaryDirectory() as tmp:
        w3 = anvil.web3()
        deployment = deploy_all(w3, dev_account(0), RegistryParams(), path=Path(tmp) / "deployment.json")
        nodes = [
            ModelNode(
                operator=dev_account(1 + i).address,
                endpoint="http://127.0.0.1:9",
                public_key=bytes(32),
                model_id=ModelId.of("tiny-llama@v1"),
                price_per_1k_tokens=PRICE,
            )
            for i in range(args.nodes)
        ]
        wallet = Wallet(
            PaymentChannels(w3, deployment.payments_address),
            dev_account(CLIENT),
            budget_wei=10**18,
            deposit_wei=10**16,
            state_dir=Path(tmp) / "client",
        )
        try:
            result = asyncio.run(
                _measure(
                    wallet,
                    nodes,
                    requests=args.requests,
                    concurrency=args.concurrency,
                    stream_ms=args.stream_ms,
                    idle_s=args.idle_s,
                    other_writer_ms=args.other_writer_ms,
                )
            )
        finally:
            wallet.close()
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
    print(json.dumps({args.label: result}, indent=2))
    merged = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    merged[args.label] = result
    RESULTS.write_text(json.dumps(merged, indent=2) + "\n")


if __name__ == "__main__":
    main()
