"""``make demo`` runs to completion: chain, registered overlay nodes, and private requests over onion paths."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from ledger import Role, Wei, format_eth
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
    # Prompts sharing a prefix followed the node holding it, whose prefix cache answered.
    assert len(set(result.destinations)) == 1
    assert result.cached_tokens[0] == 0 and all(c > 0 for c in result.cached_tokens[1:])
    # The node made busy was avoided.
    assert result.while_busy and result.while_busy != result.busy_node
    # The openai package answered through the network.
    assert len(result.openai_replies) == 2
    # Money: a channel, one voucher for what was served, redeemed and locked.
    assert result.paid_wei > 0 and result.locked_wei == result.paid_wei
    relays = [n for n in result.nodes if n.role is Role.RELAY]
    assert set(result.relay_forwards) == {n.endpoint for n in relays}
    assert all(count > 0 for count in result.relay_forwards.values())
    # Each request's 4 paths x 3 relays: each packet is forwarded once by each relay it crosses.
    assert sum(result.relay_forwards.values()) == result.requests_sent * 4 * 3
    # One relay then stopped while still registered: the client re-routed around it.
    assert result.stopped_relay in result.relay_forwards and result.rerouted_reply
    assert result.routes_tried >= 2
    text = out.getvalue()
    assert f"PlanetServe network on chain {result.deployment.chain_id}" in text
    assert result.model in text and "chain and nodes stopped" in text
    # Verification: the dishonest node was caught by the committee, slashed (stake and locked earnings), jailed,
    # its reputation fell and it got no more traffic; the honest nodes kept theirs.
    v = result.verification
    assert v is not None and v.jailed and v.penalized_epoch is not None
    assert 0 <= v.median < 500_000 and min(v.scores[v.cheater]) < 500_000
    assert v.stake_slashed > 0 and v.stake_after == v.stake_before - v.stake_slashed
    assert f"stake slashed {format_eth(Wei(v.stake_slashed))} ETH" in text
    # Its earnings were redeemed (locked) before the verdict, and the verdict took half of what was locked then.
    assert (
        v.locked_before > 0 and v.earnings_slashed > 0 and f"locked earnings slashed {v.earnings_slashed} wei" in text
    )
    assert v.reputation_after[v.cheater] < v.reputation_before[v.cheater]
    assert v.honest and all(v.reputation_after[o] >= v.reputation_before[o] for o in v.honest)
    assert all(s >= 500_000 for o in v.honest for s in v.scores.get(o, []))
    assert f"{v.reputation_before[v.cheater]} → {v.reputation_after[v.cheater]}" in text
    assert v.routed_after and v.cheater not in v.routed_after and "none to the jailed node" in text
    assert f"median {v.median} < threshold" in text
