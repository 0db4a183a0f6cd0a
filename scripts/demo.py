"""``make demo``: a local PlanetServe network end to end, as far as it exists today.

Starts anvil, deploys the contracts, registers model nodes, relays and verifiers from distinct anvil dev accounts
(their keys are anvil's public test mnemonic: fine for a local demo, never for a real chain), indexes the registry's
events and prints the network as the indexer sees it, then shuts the chain down. Later layers extend ``run_demo``
through its ``extend`` hook (e.g. start the overlay against the returned network).
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ledger import (
    Anvil,
    AnvilConfig,
    Deployment,
    IndexedNode,
    Indexer,
    NodeRegistry,
    RegistryParams,
    Role,
    deploy_all,
    dev_account,
    format_eth,
    model_id,
)
from node import NodeIdentity

DEMO_MODEL = "tiny-llama@v1"
#: (role, stake in wei, price per 1k tokens in wei) for each demo node, one dev account each (from index 1).
DEMO_NODES: tuple[tuple[Role, int, int], ...] = (
    (Role.MODEL, 2 * 10**18, 20_000_000_000_000),
    (Role.MODEL, 3 * 10**18, 15_000_000_000_000),
    (Role.MODEL, 1 * 10**18, 25_000_000_000_000),
    (Role.RELAY, 2 * 10**17, 0),
    (Role.RELAY, 2 * 10**17, 0),
    (Role.RELAY, 3 * 10**17, 0),
    (Role.RELAY, 1 * 10**17, 0),
    (Role.VERIFIER, 2 * 10**18, 0),
    (Role.VERIFIER, 2 * 10**18, 0),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoNetwork:
    """What the demo built, for extensions: the chain, the deployment and the registered nodes."""

    #: The running anvil (valid only inside the ``extend`` hook).
    anvil: Anvil
    #: Where the contracts are.
    deployment: Deployment
    #: Read-only registry handle.
    registry: NodeRegistry
    #: The nodes as indexed.
    nodes: tuple[IndexedNode, ...]
    #: Each node's state dir (holding its X25519 key), by operator address.
    state_dirs: dict[str, Path]


def _print_network(console: Console, network: DemoNetwork) -> None:
    table = Table(title=f"PlanetServe network on chain {network.deployment.chain_id} ({network.anvil.rpc_url})")
    for column in ("operator", "role", "model", "endpoint", "stake ETH", "price/1k wei", "x25519 key", "routable"):
        table.add_column(column)
    names = {model_id(DEMO_MODEL): DEMO_MODEL}
    for node in network.nodes:
        table.add_row(
            node.operator,
            node.role.name.lower(),
            names.get(node.model_id, "-"),
            node.endpoint,
            format_eth(node.stake),
            str(node.price_per_1k_tokens),
            node.x25519_public_key.hex()[:16] + "…",
            "yes" if node.active else "no",
        )
    console.print(table)


def run_demo(extend: Callable[[DemoNetwork], None] | None = None, *, console: Console | None = None) -> DemoNetwork:
    """Run the demo; ``extend`` runs while the chain is still up. Returns the network (the chain is stopped)."""
    if console is None:
        console = Console()
        if not console.is_terminal:  # piped or captured (make, CI): don't squeeze the table to 80 columns
            console = Console(width=200)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="planetserve-demo-") as tmp, Anvil(AnvilConfig()) as anvil:
        root = Path(tmp)
        w3 = anvil.web3()
        deployment = deploy_all(w3, dev_account(0), RegistryParams(), path=root / "deployment.json")
        console.print(f"deployed NodeRegistry at {deployment.registry_address} (block {deployment.deploy_block})")
        registry = NodeRegistry(w3, deployment.registry_address)
        state_dirs: dict[str, Path] = {}
        for index, (role, stake, price) in enumerate(DEMO_NODES, start=1):
            operator = dev_account(index)
            state_dir = root / f"node-{index}"
            identity = NodeIdentity.load_or_create(state_dir)
            registry.with_account(operator).register(
                role=role,
                endpoint=f"http://127.0.0.1:{8600 + index}",
                x25519_public_key=identity.public_key,
                model_id=None if role is Role.RELAY else model_id(DEMO_MODEL),
                price_per_1k_tokens=price,
                stake=stake,
            )
            state_dirs[operator.address] = state_dir
        with Indexer(registry, deployment, f"sqlite:///{root / 'index.sqlite'}") as indexer:
            report = indexer.sync()
            nodes = tuple(indexer.nodes())
        console.print(f"indexed {report.applied} events from blocks {report.from_block}..{report.to_block}")
        network = DemoNetwork(anvil=anvil, deployment=deployment, registry=registry, nodes=nodes, state_dirs=state_dirs)
        _print_network(console, network)
        if extend is not None:
            extend(network)
    console.print(f"chain stopped; demo finished in {time.perf_counter() - started:.1f} s")
    return network


def main() -> int:
    """Entry point of ``python -m scripts.demo``."""
    network = run_demo()
    expected = len(DEMO_NODES)
    return 0 if len(network.nodes) == expected and all(n.active for n in network.nodes) else 1


if __name__ == "__main__":
    sys.exit(main())
