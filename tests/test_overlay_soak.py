"""Soak: an attacker *process* abuses one relay in each way in turn while an honest client keeps sending requests
through it; at least 99% of the honest requests succeed under every kind of abuse.

Four relays and a model node run here on 127.0.0.1; the honest client sends over four 2-hop paths, two of which
start at the attacked relay (with n=4, k=3 a request fails if both of those break). The relay runs with short
limits (1 s for headers, body and frame gaps) so that each bound acts several times within a phase. The honest
success rate and median latency per abuse kind are printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import statistics
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from node.overlay import OverlayConfig, send_request
from node.overlay._localnet import LocalNetwork
from node.overlay._peers import Peer
from tests.soak_attacker import EVIL_NODE_ID, hop_to_json

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("none", "junk", "replay", "slow_headers", "slow_body", "trickle", "lone_cloves")
PHASE_S = 5.0
#: Honest clients sending at once (each one request after the other).
HONEST_CLIENTS = 3


async def answer(request: bytes) -> AsyncIterator[bytes]:
    yield b"ok:" + request


async def _honest(session: aiohttp.ClientSession, net: LocalNetwork, seconds: float) -> tuple[int, int, list[float]]:
    """Requests one after the other for ``seconds``: (sent, succeeded, latencies of the successes in ms)."""
    relays = net.descriptors()
    paths = [[relays[0], relays[1]], [relays[0], relays[2]], [relays[3], relays[1]], [relays[3], relays[2]]]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    sent = ok = 0
    latencies: list[float] = []
    while loop.time() < deadline:
        body = secrets.token_bytes(16).hex().encode()
        sent += 1
        started = loop.time()
        try:
            async with asyncio.timeout(10):
                reply = b"".join([p async for p in send_request(session, body, paths, net.destination)])
        except Exception:  # any failure counts against the success rate; the kind is not the point here
            continue
        if reply == b"ok:" + body:
            ok += 1
            latencies.append((loop.time() - started) * 1e3)
    return sent, ok, latencies


async def _attack(kind: str, net: LocalNetwork, seconds: float) -> dict[str, Any]:
    spec = {
        "kind": kind,
        "seconds": seconds,
        "relay": hop_to_json(net.relay_nodes[0].hop()),
        "relay_endpoint": net.relay_nodes[0].endpoint,
        "model": hop_to_json(net.destination.hop()),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.soak_attacker",
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(json.dumps(spec).encode() + b"\n")
        await proc.stdin.drain()
        async with asyncio.timeout(30):
            ready = json.loads(await proc.stdout.readline())
        assert ready["ready"]
        if ready["next_hop"]:  # the attacker's own node: registered, so the relay may dial it
            evil = Peer(
                node_id=EVIL_NODE_ID, endpoint=ready["next_hop"], public_key=bytes.fromhex(ready["next_hop_key"])
            )
            net.peers.add(evil)
        return {"proc": proc, "ready": ready}
    except BaseException:
        proc.kill()
        await proc.wait()
        raise


async def test_honest_requests_succeed_while_an_attacker_process_abuses_a_relay() -> None:
    template = OverlayConfig(
        x25519_secret=secrets.token_bytes(32),
        header_timeout_s=1.0,
        body_timeout_s=1.0,
        idle_timeout_s=1.0,
        assembly_timeout_s=2.0,
    )
    results: dict[str, dict[str, float]] = {}
    async with LocalNetwork(relays=4, handler=answer, template=template) as net:
        # Idle connections go before the relays' 1 s header timeout could close one under a request (see _app.py).
        connector = aiohttp.TCPConnector(limit=32, keepalive_timeout=0.5)
        async with aiohttp.ClientSession(connector=connector) as session:
            for kind in KINDS:
                attack = None if kind == "none" else await _attack(kind, net, PHASE_S)
                try:
                    runs = await asyncio.gather(*(_honest(session, net, PHASE_S) for _ in range(HONEST_CLIENTS)))
                    sent = sum(r[0] for r in runs)
                    ok = sum(r[1] for r in runs)
                    latencies = [ms for r in runs for ms in r[2]]
                finally:
                    report: dict[str, Any] = {}
                    if attack is not None:
                        proc = attack["proc"]
                        assert proc.stdout is not None
                        async with asyncio.timeout(30):
                            line = await proc.stdout.readline()
                            await proc.wait()
                        report = json.loads(line) if line else {}
                results[kind] = {
                    "sent": sent,
                    "rate": ok / sent if sent else 0.0,
                    "median_ms": statistics.median(latencies) if latencies else float("nan"),
                    "attacker_packets": report.get("sent", 0),
                    "attacker_cut": report.get("connections_cut", 0),
                }
                await net.settle(timeout_s=10)
    print("\nhonest requests under each abuse of one relay (2 of 4 paths through it):")
    print(f"  {'abuse':14} {'sent':>6} {'success':>8} {'median ms':>10} {'attacker pkts':>14} {'conns cut':>10}")
    for kind, row in results.items():
        print(
            f"  {kind:14} {row['sent']:6.0f} {row['rate']:8.1%} {row['median_ms']:10.1f}"
            f" {row['attacker_packets']:14.0f} {row['attacker_cut']:10.0f}"
        )
    for kind, row in results.items():
        assert row["sent"] >= 30, f"{kind}: too few honest requests to judge ({row['sent']})"
        assert row["rate"] >= 0.99, f"{kind}: honest success {row['rate']:.1%}"
        if kind != "none":  # the abuse really happened: packets sent, or slow connections cut and redone
            assert row["attacker_packets"] + row["attacker_cut"] >= 10, f"{kind}: the attacker did little"
