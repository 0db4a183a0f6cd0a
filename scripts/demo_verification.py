"""The demo's verification epochs: verifiers audit, a dishonest node is caught, slashed, jailed and loses its traffic.

A third model node joins the demo network: registered and staked like the others, claiming the same model, but
serving a cheaper one (the model's ``fewer-layers`` variant: half the layers, not retrained) behind the real
model's id. The two registered verifiers run ``verifier.Verifier`` (what ``ps-verifier run`` runs) over short
epochs: each audits every model node with prompts from the user distribution, sent through its own ``Client`` and
paid from its own wallet (fresh channel addresses), scores the answers on its reference engine, feeds its CUSUM and
attests. The dishonest node redeems its vouchers as it earns them. When the committee's median fails, the contract
slashes its stake and its locked earnings and jails it; a user's client, reading the registry again, no longer
routes to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from eth_account.signers.local import LocalAccount
from rich.console import Console
from web3 import Web3

from ledger import (
    Attestations,
    Deployment,
    IndexedNode,
    Indexer,
    NodeRegistry,
    PaymentChannels,
    Role,
    VoucherStore,
    Wei,
    format_eth,
    model_id,
)
from node import NodeIdentity
from node.client import Client, ClientConfig
from node.client._registry import indexer_sources
from node.client._wallet import Wallet
from node.inference import EngineConfig, TorchEngine, chunk_hashes, make_variant
from node.inference.testing import CheatConfig, CheatingEngine
from node.overlay import CompletionRequest, OverlayConfig, Route
from node.overlay._heartbeat import HeartbeatPublisher
from node.overlay._payments import PaymentGate
from node.overlay._peers import StaticPeerDirectory
from node.overlay._serve import create_model_app
from node.testing import LocalNode, serve_ephemeral
from verifier._runner import EpochReport, Verifier, VerifierConfig

#: Seconds per epoch of the demo's ``Attestations`` (a real deployment uses hours).
DEMO_EPOCH_S = 8
#: Stake and price of the dishonest node.
CHEATER_STAKE, CHEATER_PRICE = 2 * 10**18, 10_000_000_000_000
#: Longest the demo waits for the committee's verdict, seconds.
VERDICT_TIMEOUT_S = 6 * DEMO_EPOCH_S
#: Prompts a user sends after the verdict (each goes to a model node the client still routes to).
AFTER_PROMPTS: tuple[str, ...] = ("03+04=07\n11+11=", "03+04=07\n20+13=", "03+04=07\n09+09=", "03+04=07\n31+05=")


@dataclass(slots=True, kw_only=True)
class VerificationResult:
    """What the verification epochs did (for tests and the exit status)."""

    cheater: str = ""
    """The dishonest node's operator."""
    honest: tuple[str, ...] = ()
    """The honest model nodes' operators."""
    scores: dict[str, list[int]] = field(default_factory=dict)
    """Attested epoch scores per audited node (every verifier, every epoch), fixed-point."""
    penalized_epoch: int | None = None
    """The epoch whose verdict slashed the cheater."""
    median: int = 0
    """That verdict's median score, fixed-point."""
    reputation_before: dict[str, int] = field(default_factory=dict)
    """Each model node's on-chain reputation before the audits, fixed-point."""
    reputation_after: dict[str, int] = field(default_factory=dict)
    """... and after."""
    stake_before: int = 0
    """The cheater's stake before, wei."""
    stake_after: int = 0
    """... and after the slash, wei."""
    locked_before: int = 0
    """The cheater's locked earnings after its last redeem before the slash, wei."""
    locked_after: int = 0
    """... and after the slash, wei."""
    stake_slashed: int = 0
    """Stake the verdict slashed, wei (the contract's ``NodePenalized`` event)."""
    earnings_slashed: int = 0
    """Locked earnings the verdict slashed, wei (the same event)."""
    jailed: bool = False
    """Whether the cheater was jailed."""
    routed_after: list[str] = field(default_factory=list)
    """Where a user's requests went after the verdict (operators)."""
    seconds: float = 0.0
    """Wall time of this part of the demo."""


async def _mine(w3: Web3, interval_s: float) -> None:
    """Mine a block every ``interval_s`` (anvil mines only on transactions; a public chain mines on its own, and an
    epoch's audit seed is anchored to its first block)."""
    while True:
        await asyncio.sleep(interval_s)
        await asyncio.to_thread(w3.provider.make_request, "evm_mine", [])  # type: ignore[arg-type]


async def _dishonest_node(
    model_dir: Path, root: Path, account: LocalAccount, payments: PaymentChannels, peers: StaticPeerDirectory
) -> tuple[LocalNode, VoucherStore, bytes]:
    """A model node that claims the model of ``model_dir`` but answers every request with its fewer-layers variant."""
    variant = root / "fewer-layers"
    if not variant.exists():
        make_variant(model_dir, "fewer-layers", variant)
    honest = TorchEngine.from_folder(model_dir, EngineConfig(device="cpu", max_running=4))
    cheap = TorchEngine.from_folder(variant, EngineConfig(device="cpu", max_running=4))
    engine = CheatingEngine(honest, CheatConfig(mode="substitute"), substitute=cheap)
    identity = NodeIdentity.load_or_create(root / "node-dishonest")
    store = VoucherStore(
        f"sqlite:///{root / 'vouchers-dishonest.sqlite'}",
        domain=payments.domain(),
        node=account.address,
        channels=payments,
    )
    gate = PaymentGate(store, price_per_1k_tokens=CHEATER_PRICE, tokenize=honest.tokenize)
    publisher = HeartbeatPublisher(
        account=account,
        model_id=honest.model_id,
        stats=engine.stats,
        prefix_hashes=lambda prompt: chunk_hashes(honest.tokenize(prompt)),
        interval_s=0.1,
    )
    config = OverlayConfig(x25519_secret=identity.private_key, role="model")
    app = create_model_app(config, engine, peers=peers, heartbeat=publisher, payments=gate)
    runner, endpoint = await serve_ephemeral(app)
    node = LocalNode(
        name="model-dishonest",
        config=config,
        app=app,
        runner=runner,
        endpoint=endpoint,
        node_id=bytes.fromhex(account.address[2:]),
    )
    peers.add(node.peer())
    return node, store, identity.public_key


async def _redeem_while_possible(
    store: VoucherStore, payments: PaymentChannels, account: LocalAccount, result: VerificationResult
) -> None:
    """The dishonest node redeems what it earns every second (its earnings then sit locked, slashable)."""
    mine = payments.with_account(account)
    while True:
        await asyncio.sleep(1.0)
        vouchers = store.redeemable()
        if not vouchers:
            continue
        try:
            await asyncio.to_thread(mine.redeem_batch, vouchers)
        except Exception:  # jailed: a jailed node cannot redeem (PaymentChannels refuses)
            return
        store.mark_redeemed(vouchers)
        result.locked_before = int((await asyncio.to_thread(payments.balances, account.address)).locked)


async def verification_epochs(
    console: Console,
    *,
    w3: Web3,
    deployment: Deployment,
    model: str,
    model_dir: Path,
    peers: StaticPeerDirectory,
    root: Path,
    verifiers: Sequence[LocalAccount],
    payers: Sequence[LocalAccount],
    dishonest: LocalAccount,
    user_wallet: Wallet,
) -> VerificationResult:
    """Run the verification part of the demo (see the module docstring); every part it started is stopped."""
    started = time.perf_counter()
    result = VerificationResult(cheater=dishonest.address)
    assert deployment.attestations_address is not None
    registry = NodeRegistry(w3, deployment.registry_address)
    payments = PaymentChannels(w3, deployment.payments_address)
    reader = Attestations(w3, deployment.attestations_address)
    node, store, public_key = await _dishonest_node(model_dir, root, dishonest, payments, peers)
    tasks: list[asyncio.Task[None]] = [asyncio.create_task(_mine(w3, 0.5))]
    indexers: list[Indexer] = []
    wallets: list[Wallet] = []
    reference = TorchEngine.from_folder(model_dir, EngineConfig(device="cpu", max_running=8))
    try:
        registry.with_account(dishonest).register(
            role=Role.MODEL,
            endpoint=node.endpoint,
            x25519_public_key=public_key,
            model_id=model_id(model),
            price_per_1k_tokens=CHEATER_PRICE,
            stake=CHEATER_STAKE,
        )
        console.print(
            f"a dishonest model node {dishonest.address[:10]}… joins: registered and staked "
            f"({format_eth(registry.stake_of(dishonest.address))} ETH) for {model}, but it serves the model's "
            "fewer-layers variant (half the layers) behind the real model's id"
        )
        wanted = model_id(model)
        serving = [
            n.operator
            for n in _nodes_now(registry, deployment, root, indexers)
            if n.role is Role.MODEL and str(n.model_id) == str(wanted)
        ]
        result.honest = tuple(o for o in serving if o != dishonest.address)
        result.reputation_before = {o: reader.reputation_of(o) for o in serving}
        result.stake_before = int(registry.stake_of(dishonest.address))
        tasks.append(asyncio.create_task(_redeem_while_possible(store, payments, dishonest, result)))

        committee: list[Verifier] = []
        clients: list[Client] = []
        for i, (account, payer) in enumerate(zip(verifiers, payers, strict=True)):
            indexer = Indexer(registry, deployment, f"sqlite:///{root / f'index-verifier-{i}.sqlite'}")
            indexers.append(indexer)
            nodes, directory = indexer_sources(indexer)
            wallet = Wallet(
                payments,
                payer,
                budget_wei=10**17,
                deposit_wei=10**16,
                state_dir=root / f"verifier-{i}" / "wallet",
                fresh_addresses=True,
            )
            wallets.append(wallet)
            client = Client(directory, ClientConfig(models=(model,)), wallet=wallet)
            clients.append(client)
            committee.append(
                Verifier(
                    VerifierConfig(
                        state_dir=root / f"verifier-{i}",
                        model_dir=model_dir,
                        mean_challenges=6.0,
                        max_challenges=16,
                        max_prompt_chars=600,
                    ),
                    account=account,
                    attestations=Attestations(w3, deployment.attestations_address, account),
                    nodes=nodes,
                    client=client,
                    engine=reference,
                    model_id=str(model_id(model)),
                )
            )
        length = reader.epoch_length()
        console.print(
            f"verification: {len(committee)} staked verifiers (committee {reader.committee_size()}, quorum "
            f"{reader.quorum()}), epochs of {length} s; each audits every model node with prompts drawn from the "
            "user distribution, sent through its own Client (onion paths, S-IDA cloves) at Poisson times and paid "
            "from its own wallet like any user; answers scored on its reference engine (seeded replay, per-token "
            "log-probs, likelihood), a CUSUM across epochs, then attested on chain with the evidence hash"
        )

        def report(verifier: Verifier) -> Callable[[EpochReport], None]:
            def show(epoch: EpochReport) -> None:
                for v in epoch.verdicts:
                    if v.score is not None:
                        result.scores.setdefault(v.node, []).append(v.score)
                    scores = ", ".join(f"{s:.2f}" for s in v.scores)
                    console.print(
                        f"  verifier {verifier.account.address[:10]}… epoch {epoch.epoch}: node {v.node[:10]}… "
                        f"answered {v.answered}/{v.sent} audits, challenge scores [{scores}] → attested "
                        f"{v.score if v.score is not None else '-'}{' (CUSUM alarm)' if v.alarm else ''}: {v.outcome}"
                    )
                    if v.outcome == "penalized" and v.node == dishonest.address:
                        result.penalized_epoch = epoch.epoch
                for skipped in epoch.skipped:
                    console.print(f"  epoch {epoch.epoch}: node {skipped[:10]}… skipped (jailed)")

            return show

        runs = [asyncio.create_task(v.run(None, on_epoch=report(v))) for v in committee]
        try:
            deadline = time.monotonic() + VERDICT_TIMEOUT_S + 2 * length
            while time.monotonic() < deadline and not registry.is_jailed(dishonest.address):
                await asyncio.sleep(0.5)
            # Jailed: let the epoch that did it finish reporting (its other verdicts, its state file).
            settle = time.monotonic() + length
            while time.monotonic() < settle and result.penalized_epoch is None:
                await asyncio.sleep(0.2)
        finally:
            for run in runs:
                run.cancel()
            await asyncio.gather(*runs, return_exceptions=True)
            for client in clients:
                await client.close()
        result.jailed = registry.is_jailed(dishonest.address)
        result.stake_after = int(registry.stake_of(dishonest.address))
        result.locked_after = int(payments.balances(dishonest.address).locked)
        result.reputation_after = {o: reader.reputation_of(o) for o in result.reputation_before}
        if result.penalized_epoch is None:
            record = reader.record_of(dishonest.address)
            console.print(f"no verdict within {VERDICT_TIMEOUT_S} s (penalties on chain: {record.penalties})")
        else:
            tally = reader.tally(dishonest.address, result.penalized_epoch)
            result.median = tally.median
            for event in reader.contract.events.NodePenalized().get_logs(from_block=deployment.deploy_block):
                if event["args"]["node"] == dishonest.address and event["args"]["epoch"] == result.penalized_epoch:
                    result.stake_slashed = int(event["args"]["stakeSlashed"])
                    result.earnings_slashed = int(event["args"]["earningsSlashed"])
            console.print(
                f"committee verdict for node {dishonest.address[:10]}…, epoch {result.penalized_epoch}: scores "
                f"{list(tally.scores)}, median {tally.median} < threshold {reader.score_threshold()} → FAILED: "
                f"stake slashed {format_eth(Wei(result.stake_slashed))} ETH "
                f"({format_eth(Wei(result.stake_before))} → {format_eth(Wei(result.stake_after))}), locked earnings "
                f"slashed {result.earnings_slashed} wei (of {result.locked_before} locked after its last redeem; "
                f"{result.locked_after} left), jailed: {result.jailed}"
            )
        console.print(
            "reputation: "
            + ", ".join(
                f"{o[:10]}…{' (dishonest)' if o == dishonest.address else ''} "
                f"{result.reputation_before[o]} → {result.reputation_after[o]}"
                for o in result.reputation_before
            )
        )
        # A user's client reads the registry again: the jailed node is no longer a candidate.
        indexer = Indexer(registry, deployment, f"sqlite:///{root / 'index-user-after.sqlite'}")
        indexers.append(indexer)
        _, directory = indexer_sources(indexer)
        routes: list[Route] = []
        async with Client(
            directory,
            ClientConfig(models=(model,), policy="round_robin"),
            on_route=routes.append,
            wallet=user_wallet,
        ) as user:
            for prompt in AFTER_PROMPTS:
                await user.complete(
                    CompletionRequest(model=model_id(model), prompt=prompt, max_tokens=4, temperature=0.0)
                )
        result.routed_after = [r.destination.operator for r in routes]
        reached = sorted({f"{o[:10]}…" for o in result.routed_after})
        jailed_hits = result.routed_after.count(dishonest.address)
        console.print(
            f"after the verdict a user's {len(AFTER_PROMPTS)} requests (round robin) went to {', '.join(reached)}: "
            + (f"none to the jailed node {dishonest.address[:10]}…" if not jailed_hits else f"{jailed_hits} to it")
        )
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for wallet in wallets:
            wallet.close()
        for indexer in indexers:
            indexer.close()
        await reference.close()
        with contextlib.suppress(Exception):
            await node.stop()
        store.close()
    result.seconds = time.perf_counter() - started
    console.print(f"verification epochs took {result.seconds:.1f} s")
    return result


def _nodes_now(
    registry: NodeRegistry, deployment: Deployment, root: Path, keep: list[Indexer]
) -> Sequence[IndexedNode]:
    indexer = Indexer(registry, deployment, f"sqlite:///{root / 'index-demo-verify.sqlite'}")
    keep.append(indexer)
    indexer.sync()
    return indexer.nodes()
