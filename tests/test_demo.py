"""``make demo`` runs to completion: chain, registered overlay nodes, and private requests over onion paths."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from ledger import Role
from scripts.demo import DEMO_NODES, DEMO_PROMPTS, run_demo


async def test_demo_serves_private_requests_through_registered_relays(tiny_model_dir: Path) -> None:
    out = io.StringIO()
    result = await run_demo(tiny_model_dir, console=Console(file=out, width=200))
    assert len(result.nodes) == len(DEMO_NODES) and all(n.active for n in result.nodes)
    assert sorted(n.role for n in result.nodes) == sorted(role for role, _, _ in DEMO_NODES)
    # Every relay and model node registered the endpoint it really listened on.
    served = [n for n in result.nodes if n.role is not Role.VERIFIER]
    assert all(n.endpoint in out.getvalue() for n in served)
    assert len(result.replies) == len(DEMO_PROMPTS) and all(result.replies)
    assert result.cached_tokens[0] == 0 and result.cached_tokens[1] > 0
    relays = [n for n in result.nodes if n.role is Role.RELAY]
    assert set(result.relay_forwards) == {n.endpoint for n in relays}
    assert all(count > 0 for count in result.relay_forwards.values())
    # 2 requests x 4 paths x 3 relays: each packet is forwarded once by each relay it crosses.
    assert sum(result.relay_forwards.values()) == len(DEMO_PROMPTS) * 4 * 3
    # One relay then stopped while still registered: the client re-routed around it.
    assert result.stopped_relay in result.relay_forwards and result.rerouted_reply
    assert result.routes_tried >= 2
    text = out.getvalue()
    assert f"PlanetServe network on chain {result.deployment.chain_id}" in text
    assert result.model in text and "chain and nodes stopped" in text
