"""``make demo``: a local PlanetServe network end to end, as far as it exists today.

1. Builds (once, then cached under ``build/models``) the project's default model, which depends on its prompt (it
   learned zero-padded addition): no download, ever.
2. Starts anvil and deploys the contracts.
3. Starts real overlay nodes on 127.0.0.1 (model nodes with a torch engine, relays) and registers each on chain with
   its real endpoint and X25519 key, from distinct anvil dev accounts (anvil's public test mnemonic: fine for a local
   demo, never for a real chain). Verifiers are registered and staked; their process comes with verification.
4. Indexes the registry's events and prints the network as a client sees it.
5. A ``Client`` (the paper's user node) resolves the model on chain, reads the model nodes' signed heartbeats, and
   for each request picks a model node with the ``planetserve`` forwarding policy and 4 onion paths of 3 relays,
   sends S-IDA cloves and streams the reply back over the reverse paths. Prompts sharing a prefix follow the node
   that holds it (its prefix cache answers); a node made busy is avoided.
6. The official ``openai`` package, pointed at the OpenAI-compatible endpoint, answers through the same network.
7. Money: every request carries a cumulative EIP-712 voucher inside its sealed envelope (completion protocol v2); the
   client's wallet opens a channel to each model node it uses; each model node checks the voucher before its engine
   runs, then redeems its latest vouchers in one transaction, and its earnings are locked for the verification
   window.
8. One relay is stopped while still registered: the client re-routes around it.
9. Verification (``scripts/demo_verification.py``): a dishonest model node joins (it serves a cheaper model behind
   the real one's id); the verifiers audit every model node through their own paying ``Client`` over short epochs,
   attest, and the committee's failing median slashes its stake and locked earnings and jails it; a user's client
   then no longer routes to it.
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
from eth_account.signers.local import LocalAccount
from rich.console import Console
from rich.table import Table

from ledger import (
    Anvil,
    AnvilConfig,
    AttestationParams,
    Deployment,
    IndexedNode,
    Indexer,
    NodeRegistry,
    PaymentChannels,
    RegistryParams,
    Role,
    VoucherStore,
    Wei,
    deploy_all,
    dev_account,
    format_eth,
    model_id,
)
from node import NodeIdentity
from node.client import Client, ClientConfig, ClientService, create_openai_app, load_tokenizer
from node.client._wallet import Wallet
from node.inference import (
    EngineConfig,
    GenerationRequest,
    ModelRecipe,
    SamplingParams,
    TorchEngine,
    ensure_model,
    read_info,
)
from node.inference._prefix import chunk_hashes
from node.overlay import CompletionRequest, Directory, OverlayConfig, Route
from node.overlay._heartbeat import HeartbeatPublisher
from node.overlay._lifecycle import stop_all
from node.overlay._payments import PaymentGate
from node.overlay._peers import StaticPeerDirectory
from node.overlay._serve import create_model_app
from node.testing import LocalNode, serve_ephemeral, start_node
from scripts.demo_verification import DEMO_EPOCH_S, VerificationResult, verification_epochs

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
_SHOTS = "03+04=07\n10+05=15\n21+08=29\n06+06=12\n"
#: Prompts sharing a prefix.
DEMO_PROMPTS: tuple[str, ...] = (_SHOTS + "12+07=", _SHOTS + "30+04=", _SHOTS + "05+09=")
#: The deposit of the demo's payment channel, wei (0.01 ETH).
CHANNEL_DEPOSIT = 10**16


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
    destinations: list[str] = field(default_factory=list)
    """The model node (operator) each prompt sharing the prefix went to."""
    busy_node: str = ""
    """The model node made busy before the next request."""
    while_busy: str = ""
    """Where the request sent while it was busy went."""
    openai_replies: list[str] = field(default_factory=list)
    """What the ``openai`` package got back (a chat completion, then a streamed completion)."""
    paid_wei: int = 0
    """What the model nodes redeemed, wei (the latest cumulative voucher of each channel)."""
    locked_wei: int = 0
    """The model nodes' earnings locked on the payment contract after redeeming, wei."""
    requests_sent: int = 0
    """Requests sent over the overlay before the relay was stopped."""
    served_tokens: dict[str, list[int]] = field(default_factory=dict)
    """Prompt plus completion tokens of each request, by the model node (operator) that served it."""
    verification: VerificationResult | None = None
    """What the verification epochs did."""
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


async def _model_node(
    index: int,
    config: OverlayConfig,
    engine: TorchEngine,
    operator: LocalAccount,
    peers: StaticPeerDirectory,
    node_id: bytes,
    gate: PaymentGate,
) -> LocalNode:
    """A model node that publishes heartbeats signed by its operator (load, TTFT, salted cache summary) and serves
    only requests carrying a valid voucher (``gate``, checked before the engine runs)."""
    publisher = HeartbeatPublisher(
        account=operator,
        model_id=engine.model_id,
        stats=engine.stats,
        prefix_hashes=lambda prompt: chunk_hashes(engine.tokenize(prompt)),
        interval_s=0.1,
    )
    app = create_model_app(config, engine, peers=peers, heartbeat=publisher, payments=gate)
    runner, endpoint = await serve_ephemeral(app)
    node = LocalNode(name=f"model-{index}", config=config, app=app, runner=runner, endpoint=endpoint, node_id=node_id)
    peers.add(node.peer())
    return node


def _request(model: str, prompt: str, max_tokens: int = 8) -> CompletionRequest:
    return CompletionRequest(model=model_id(model), prompt=prompt, max_tokens=max_tokens, temperature=0.0, stop=("\n",))


async def _requests(
    console: Console,
    result: DemoResult,
    directory: Directory,
    model: str,
    model_dir: Path,
    models: list[tuple[str, TorchEngine]],
    wallet: Wallet,
) -> None:
    """Forwarding at work, then the openai package through the same client; every request paid by ``wallet``."""
    routes: list[Route] = []
    client = Client(
        directory,
        ClientConfig(models=(model,), heartbeat_refresh_s=0.0),
        tokenizer=load_tokenizer(model_dir),
        on_route=routes.append,
        wallet=wallet,
    )
    async with client:
        for prompt in DEMO_PROMPTS:
            sent = time.perf_counter()
            done = await client.complete(_request(model, prompt))
            destination = routes[-1].destination.operator
            result.replies.append(done.text)
            result.cached_tokens.append(done.cached_tokens)
            result.destinations.append(destination)
            result.served_tokens.setdefault(destination, []).append(done.prompt_tokens + done.completion_tokens)
            console.print(
                f"client → model node {destination[:10]}… (planetserve policy) over 4 paths × 3 relays (n=4, k=3): "
                f"{prompt[len(_SHOTS) :]!r} after the shared examples → {done.text!r} "
                f"[{done.completion_tokens} tokens, {done.cached_tokens} prompt tokens from its prefix cache, "
                f"{(time.perf_counter() - sent) * 1e3:.0f} ms]"
            )
        # Make the node holding the prefix busy (six long generations straight on its engine); a new prompt goes
        # to the other one, read from the busy node's own signed heartbeat.
        result.busy_node = result.destinations[-1]
        busy = next(engine for operator, engine in models if operator == result.busy_node)
        params = SamplingParams(max_tokens=120, temperature=0.0)

        async def load(i: int) -> None:
            request = GenerationRequest(request_id=f"demo-load-{i}", prompt=_SHOTS + f"{i:02d}+{i:02d}=", params=params)
            async for _ in busy.generate(request):
                pass

        background = [asyncio.create_task(load(i)) for i in range(6)]
        try:
            while busy.stats().running_requests + busy.stats().queued_requests < 4:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.15)
            done = await client.complete(_request(model, "40+02="))
            result.while_busy = routes[-1].destination.operator
            result.served_tokens.setdefault(result.while_busy, []).append(done.prompt_tokens + done.completion_tokens)
            console.print(
                f"model node {result.busy_node[:10]}… busy ({busy.stats().running_requests} running, "
                f"{busy.stats().queued_requests} queued, per its signed heartbeat): the next request went to "
                f"{result.while_busy[:10]}… → {done.text!r}"
            )
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)

        # The official openai package, with only base_url changed, through the same private network.
        import openai

        service = ClientService(client)
        await service.refresh()
        runner, url = await serve_ephemeral(create_openai_app(service))
        try:
            async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as api:
                chat = await api.chat.completions.create(
                    model=model.split("@")[0],
                    messages=[{"role": "user", "content": "12+07="}],
                    max_tokens=6,
                    temperature=0,
                )
                stream = await api.completions.create(
                    model=model, prompt=_SHOTS + "02+02=", max_tokens=6, temperature=0, stream=True
                )
                streamed = "".join([c.choices[0].text async for c in stream if c.choices])
            result.openai_replies = [chat.choices[0].message.content or "", streamed]
            console.print(
                f"openai package at {url}/v1: chat.completions → {result.openai_replies[0]!r}; "
                f"streamed completions → {streamed!r} (both sent privately by the same Client)"
            )
        finally:
            await runner.cleanup()
    result.requests_sent = len(DEMO_PROMPTS) + 1 + 2


def _claim(
    console: Console,
    result: DemoResult,
    payments: PaymentChannels,
    stores: dict[str, VoucherStore],
    wallet: Wallet,
) -> None:
    """Each model node redeems its latest vouchers in one transaction; the earnings are then locked."""
    for channel in wallet.channels():
        console.print(
            f"payment channel {channel.channel_id}: client {wallet.address[:10]}… → node {channel.node[:10]}…, "
            f"deposit {format_eth(Wei(channel.deposit))} ETH, last voucher {channel.last} wei "
            f"(each request carried a cumulative EIP-712 voucher inside its sealed envelope)"
        )
    for node, store in stores.items():
        vouchers = store.redeemable()
        if not vouchers:
            continue
        operator = next(dev_account(i) for i in range(1, len(DEMO_NODES) + 1) if dev_account(i).address == node)
        receipt = payments.with_account(operator).redeem_batch(vouchers)
        store.mark_redeemed(vouchers)
        balances = payments.balances(node)
        result.paid_wei += sum(v.cumulative_amount for v in vouchers)
        result.locked_wei += int(balances.locked)
        console.print(
            f"node {node[:10]}… redeemed {len(vouchers)} voucher(s) for {sum(v.cumulative_amount for v in vouchers)} "
            f"wei in one transaction ({receipt.gas_used} gas): {balances.locked} wei locked until the verification "
            f"window ends, then withdrawable"
        )


async def run_demo(model_dir: Path, *, console: Console) -> DemoResult:
    """Run the whole demo against the model folder ``model_dir``; every process and server is stopped at the end."""
    started = time.perf_counter()
    info = read_info(model_dir)
    if info is None:
        raise SystemExit(f"{model_dir} has no planetserve.json: build it with `ps-node model make`")
    model = f"{info.name}@{info.revision}"
    nodes_up: list[LocalNode] = []
    engines: list[TorchEngine] = []
    # The nodes, the deployer, the demo's paying client, then the dishonest node and the verifiers' two payers.
    chain = AnvilConfig(accounts=len(DEMO_NODES) + 5)
    with tempfile.TemporaryDirectory(prefix="planetserve-demo-") as tmp, Anvil(chain) as anvil:
        root = Path(tmp)
        w3 = anvil.web3()
        deployment = deploy_all(
            w3,
            dev_account(0),
            RegistryParams(),
            path=root / "deployment.json",
            attestation_params=AttestationParams(epoch_length=DEMO_EPOCH_S),  # short epochs, for the demo only
        )
        console.print(f"deployed NodeRegistry at {deployment.registry_address} (block {deployment.deploy_block})")
        registry = NodeRegistry(w3, deployment.registry_address)
        payments = PaymentChannels(w3, deployment.payments_address)
        stores: dict[str, VoucherStore] = {}
        # The demo's user: pays from its own dev account, one channel per model node it uses, within a budget.
        user = dev_account(len(DEMO_NODES) + 1)
        wallet = Wallet(payments, user, budget_wei=4 * CHANNEL_DEPOSIT, deposit_wei=CHANNEL_DEPOSIT)
        try:
            relays: list[LocalNode] = []
            models: list[tuple[str, TorchEngine]] = []
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
                        store = VoucherStore(
                            f"sqlite:///{root / f'vouchers-{index}.sqlite'}",
                            domain=payments.domain(),
                            node=operator.address,
                            channels=payments,
                        )
                        stores[operator.address] = store
                        gate = PaymentGate(store, price_per_1k_tokens=price, tokenize=engine.tokenize)
                        node = await _model_node(index, config, engine, operator, peers, node_id, gate)
                        models.append((operator.address, engine))
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
            await _requests(console, result, directory, model, model_dir, models, wallet)
            async with aiohttp.ClientSession() as session:
                for relay in relays:
                    result.relay_forwards[relay.endpoint] = await _forwarded(session, relay)
            _claim(console, result, payments, stores, wallet)

            verifiers = [dev_account(i) for i, (role, _, _) in enumerate(DEMO_NODES, start=1) if role is Role.VERIFIER]
            result.verification = await verification_epochs(
                console,
                w3=w3,
                deployment=deployment,
                model=model,
                model_dir=model_dir,
                peers=peers,
                root=root,
                verifiers=verifiers,
                payers=[dev_account(len(DEMO_NODES) + 3 + i) for i in range(len(verifiers))],
                dishonest=dev_account(len(DEMO_NODES) + 2),
                user_wallet=wallet,
            )

            # A relay dies but is still registered: the client finds out from its paths and re-routes.
            victim = relays[0]
            await victim.stop()
            result.stopped_relay = victim.endpoint
            routes: list[Route] = []
            client = Client(
                directory,
                ClientConfig(models=(model,), attempts=3, heartbeats=False),
                on_route=routes.append,
                wallet=wallet,
            )
            async with client:
                sent = time.perf_counter()
                rerouted = await client.complete(_request(model, _SHOTS + "08+09="))
            result.rerouted_reply = rerouted.text
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
            try:
                await stop_all(node.stop for node in nodes_up)  # a model node's app closes its engine
            finally:
                for store in stores.values():
                    store.close()
                wallet.close()  # the user's book (a temporary folder, removed with it)
    result.seconds = time.perf_counter() - started
    console.print(f"chain and nodes stopped; demo finished in {result.seconds:.1f} s")
    return result


def main() -> int:
    """Entry point of ``python -m scripts.demo``."""
    logging.basicConfig(level=logging.WARNING)
    console = Console()
    if not console.is_terminal:  # piped or captured (make, CI): don't squeeze the table to 80 columns
        console = Console(width=200)
    console.print("building or loading the demo model (first run: about 5 minutes on 2 cores) …")
    model_dir = ensure_model(ModelRecipe.default(), MODEL_ROOT, progress=lambda line: console.print(line, markup=False))
    result = asyncio.run(run_demo(model_dir, console=console))
    ok = (
        len(result.nodes) == len(DEMO_NODES)
        and all(n.active for n in result.nodes)
        and len(result.replies) == len(DEMO_PROMPTS)
        and all(count > 0 for count in result.relay_forwards.values())
        and result.verification is not None
        and result.verification.jailed
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
