"""``make demo``: a local PlanetServe network end to end, as far as it exists today.

1. Builds (once, then cached under ``build/models``) the project's quick model: no download, ever.
2. Starts anvil and deploys the contracts.
3. Starts real overlay nodes on 127.0.0.1 (model nodes with a torch engine, relays) and registers each on chain with
   its real endpoint and X25519 key, from distinct anvil dev accounts (anvil's public test mnemonic: fine for a local
   demo, never for a real chain). Verifiers are registered and staked; their process comes with verification.
4. Indexes the registry's events and prints the network as a client sees it.
5. A client resolves the model on chain, picks a model node and 4 onion paths of 3 relays from the registry, sends
   S-IDA cloves, and streams the reply back over the reverse paths; a second prompt sharing a prefix shows the model
   node's prefix cache at work. Relay counters show the traffic really crossed the relays.

Payments (vouchers) and verification (challenges, attestations) join this script with their issues.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
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
from node.inference import EngineConfig, ModelRecipe, TorchEngine, ensure_model, read_info
from node.overlay import (
    ClientSettings,
    CompletionRequest,
    Directory,
    OverlayConfig,
    Route,
    complete,
    complete_routed,
    completion_handler,
)
from node.overlay._localnet import LocalNode, start_node
from node.overlay._peers import StaticPeerDirectory

ROOT = Path(__file__).resolve().parents[1]
#: Where the demo's model is cached (``ensure_model`` names the folder by its recipe's hash).
MODEL_ROOT = ROOT / "build" / "models"
#: (role, stake in wei, price per 1k tokens in wei) for each demo node, one dev account each (from index 1).
DEMO_NODES: tuple[tuple[Role, int, int], ...] = (
    (Role.MODEL, 2 * 10**18, 20_000_000_000_000),
    (Role.MODEL, 3 * 10**18, 15_000_000_000_000),
    (Role.RELAY, 2 * 10**17, 0),
    (Role.RELAY, 2 * 10**17, 0),
    (Role.RELAY, 3 * 10**17, 0),
    (Role.RELAY, 1 * 10**17, 0),
    (Role.RELAY, 1 * 10**17, 0),
    (Role.VERIFIER, 2 * 10**18, 0),
    (Role.VERIFIER, 2 * 10**18, 0),
)
#: Few-shot examples both prompts share: longer than a prefix-cache chunk (16 tokens), so the second prompt reuses
#: the first one's KV at the model node.
_SHOTS = "3+4=7\n10+5=15\n21+8=29\n6+6=12\n"
#: Two prompts sharing a prefix.
DEMO_PROMPTS: tuple[str, ...] = (_SHOTS + "12+7=", _SHOTS + "30+4=")


@dataclass(slots=True, kw_only=True)
class DemoResult:
    """What the demo did, for tests and for the exit status."""

    deployment: Deployment
    """Where the contracts were."""
    nodes: tuple[IndexedNode, ...]
    """The nodes as indexed."""
    model: str
    """``name@revision`` of the served model."""
    replies: list[str] = field(default_factory=list)
    """Each prompt's completion text."""
    cached_tokens: list[int] = field(default_factory=list)
    """Each reply's prefix-cache hit tokens at the model node."""
    relay_forwards: dict[str, int] = field(default_factory=dict)
    """Packets each relay forwarded, by endpoint (before one relay is stopped)."""
    stopped_relay: str = ""
    """The relay stopped before the last request, by endpoint."""
    rerouted_reply: str = ""
    """The last request's completion, sent with that relay still in the registry but down."""
    routes_tried: int = 0
    """Routes the last request needed (the first includes the dead relay on several paths)."""
    seconds: float = 0.0
    """Wall time of the whole demo."""


def _print_network(console: Console, chain_id: int, rpc_url: str, nodes: tuple[IndexedNode, ...], model: str) -> None:
    table = Table(title=f"PlanetServe network on chain {chain_id} ({rpc_url})")
    for column in ("operator", "role", "model", "endpoint", "stake ETH", "price/1k wei", "x25519 key", "routable"):
        table.add_column(column)
    names = {model_id(model): model}
    for node in nodes:
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


async def _forwarded(session: aiohttp.ClientSession, node: LocalNode) -> int:
    async with session.get(node.endpoint + "/overlay/metrics") as response:
        return int((await response.json())["forwarded"])


async def run_demo(model_dir: Path, *, console: Console) -> DemoResult:
    """Run the whole demo against the model folder ``model_dir``; every process and server is stopped at the end."""
    started = time.perf_counter()
    info = read_info(model_dir)
    if info is None:
        raise SystemExit(f"{model_dir} has no planetserve.json: build it with `ps-node model make`")
    model = f"{info.name}@{info.revision}"
    nodes_up: list[LocalNode] = []
    engines: list[TorchEngine] = []
    with tempfile.TemporaryDirectory(prefix="planetserve-demo-") as tmp, Anvil(AnvilConfig()) as anvil:
        root = Path(tmp)
        w3 = anvil.web3()
        deployment = deploy_all(w3, dev_account(0), RegistryParams(), path=root / "deployment.json")
        console.print(f"deployed NodeRegistry at {deployment.registry_address} (block {deployment.deploy_block})")
        registry = NodeRegistry(w3, deployment.registry_address)
        try:
            relays: list[LocalNode] = []
            # The relays' view of the registry: each node is added under its operator address as it starts.
            peers = StaticPeerDirectory()
            for index, (role, stake, price) in enumerate(DEMO_NODES, start=1):
                operator = dev_account(index)
                identity = NodeIdentity.load_or_create(root / f"node-{index}")
                node_id = bytes.fromhex(operator.address[2:])  # the registry keys nodes by operator address
                endpoint = f"http://127.0.0.1:{8600 + index}"  # verifiers: registered, no process yet
                if role is not Role.VERIFIER:
                    config = OverlayConfig(
                        x25519_secret=identity.private_key, role="model" if role is Role.MODEL else "relay"
                    )
                    if role is Role.MODEL:
                        engine = TorchEngine.from_folder(model_dir, EngineConfig(device="cpu", max_running=4))
                        engines.append(engine)
                        node = await start_node(
                            f"model-{index}", config, completion_handler(engine), peers=peers, node_id=node_id
                        )
                    else:
                        node = await start_node(f"relay-{index}", config, peers=peers, node_id=node_id)
                        relays.append(node)
                    nodes_up.append(node)
                    endpoint = node.endpoint
                registry.with_account(operator).register(
                    role=role,
                    endpoint=endpoint,
                    x25519_public_key=identity.public_key,
                    model_id=None if role is Role.RELAY else model_id(model),
                    price_per_1k_tokens=price,
                    stake=stake,
                )
            with Indexer(registry, deployment, f"sqlite:///{root / 'index.sqlite'}") as indexer:
                report = indexer.sync()
                nodes = tuple(indexer.nodes())
            console.print(f"indexed {report.applied} events from blocks {report.from_block}..{report.to_block}")
            _print_network(console, deployment.chain_id, anvil.rpc_url, nodes, model)
            result = DemoResult(deployment=deployment, nodes=nodes, model=model)

            directory = Directory.from_registry(nodes)
            wanted = "0x" + model_id(model).hex()
            settings = ClientSettings(n=4, k=3)
            async with aiohttp.ClientSession() as session:
                for prompt in DEMO_PROMPTS:
                    route = directory.route(wanted, n=4, hops=3)
                    request = CompletionRequest(
                        model=wanted, prompt=prompt, max_tokens=8, temperature=0.0, stop=("\n",)
                    )
                    sent = time.perf_counter()
                    deltas = [
                        d async for d in complete(session, request, route.paths, route.destination.peer(), settings)
                    ]
                    took = time.perf_counter() - sent
                    text = "".join(d.text for d in deltas)
                    result.replies.append(text)
                    result.cached_tokens.append(deltas[-1].cached_tokens)
                    console.print(
                        f"client → model node {route.destination.operator[:10]}… over 4 paths × 3 relays "
                        f"(n=4, k=3): prompt {prompt!r} → {text!r} "
                        f"[{deltas[-1].completion_tokens} tokens, {deltas[-1].cached_tokens} prompt tokens from "
                        f"the prefix cache, {took * 1e3:.0f} ms]"
                    )
                for relay in relays:
                    result.relay_forwards[relay.endpoint] = await _forwarded(session, relay)

                # A relay dies but is still registered: the client finds out from its paths and re-routes.
                victim = relays[0]
                await victim.stop()
                result.stopped_relay = victim.endpoint
                routes: list[Route] = []
                request = CompletionRequest(
                    model=wanted, prompt=_SHOTS + "8+9=", max_tokens=8, temperature=0.0, stop=("\n",)
                )
                sent = time.perf_counter()
                replies = complete_routed(
                    session, directory, request, settings=settings, attempts=3, on_route=routes.append
                )
                deltas = [d async for d in replies]
                result.rerouted_reply = "".join(d.text for d in deltas)
                result.routes_tried = len(routes)
                console.print(
                    f"relay :{victim.endpoint.rsplit(':', 1)[1]} stopped (still registered): the next request "
                    f"failed before any reply on {len(routes) - 1} route(s), was re-routed around it and answered "
                    f"{result.rerouted_reply!r} in {(time.perf_counter() - sent) * 1e3:.0f} ms"
                )
            console.print(
                "packets forwarded per relay: "
                + ", ".join(
                    f"{endpoint.rsplit(':', 1)[1]}: {count}" for endpoint, count in result.relay_forwards.items()
                )
            )
        finally:
            for node in nodes_up:
                await node.stop()
            for engine in engines:
                await engine.close()
    result.seconds = time.perf_counter() - started
    console.print(f"chain and nodes stopped; demo finished in {result.seconds:.1f} s")
    return result


def main() -> int:
    """Entry point of ``python -m scripts.demo``."""
    logging.basicConfig(level=logging.WARNING)
    console = Console()
    if not console.is_terminal:  # piped or captured (make, CI): don't squeeze the table to 80 columns
        console = Console(width=200)
    console.print("building or loading the demo model (first run: under a minute) …")
    model_dir = ensure_model(ModelRecipe.quick(), MODEL_ROOT, progress=lambda line: console.print(line, markup=False))
    result = asyncio.run(run_demo(model_dir, console=console))
    ok = (
        len(result.nodes) == len(DEMO_NODES)
        and all(n.active for n in result.nodes)
        and len(result.replies) == len(DEMO_PROMPTS)
        and all(count > 0 for count in result.relay_forwards.values())
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
