"""``make demo``'s chain part runs to completion and shows every demo node as routable."""

from __future__ import annotations

import io

from rich.console import Console

from scripts.demo import DEMO_NODES, DemoNetwork, run_demo


def test_demo_registers_indexes_and_prints_the_network() -> None:
    out = io.StringIO()
    seen: list[int] = []

    def extend(network: DemoNetwork) -> None:
        # the chain is up while extensions run
        seen.append(network.anvil.web3().eth.block_number)
        for node in network.nodes:
            assert network.registry.is_active(node.operator)

    network = run_demo(extend, console=Console(file=out, width=200))
    assert len(network.nodes) == len(DEMO_NODES) and all(n.active for n in network.nodes)
    assert sorted(n.role for n in network.nodes) == sorted(role for role, _, _ in DEMO_NODES)
    assert seen and seen[0] >= len(DEMO_NODES) + 1
    text = out.getvalue()
    assert "PlanetServe network on chain 31337" in text and "tiny-llama@v1" in text and "chain stopped" in text
    assert network.anvil.pid is None  # shut down
