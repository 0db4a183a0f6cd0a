"""``ps-verifier run``: audit the model nodes serving a model, epoch by epoch, and attest their scores on chain.

Keys: the verifier's registered key comes from ``PS_PRIVATE_KEY`` or ``--keystore`` (it signs the epoch seeds and
the attestations). Audits are paid like a user's requests, by a wallet with fresh per-channel addresses; its funds
come from ``PS_PAYER_KEY`` when set (an account not linked to the verifier: recommended, since the funding
transfer of a fresh address is visible on chain), else from the verifier's own key, with a warning.

Output: one line per audited node and epoch on stdout (``--json``: one JSON object per epoch per line); progress
and the structured audit log on stderr.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cli._node_chain import (
    DEFAULT_RPC_URL,
    DeploymentOpt,
    JsonOpt,
    Keystore,
    RegistryIndexDb,
    RpcUrl,
    StateDir,
    default_index_db,
    load_operator,
    open_chain,
)
from cli._output import info

if TYPE_CHECKING:
    from verifier._runner import EpochReport


def _state_dir(value: Path | None) -> Path:
    from platformdirs import user_data_dir

    return value if value is not None else Path(user_data_dir("planetserve")) / "verifier"


def _print_report(report: EpochReport, *, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(
            json.dumps(
                {
                    "epoch": report.epoch,
                    "verdicts": [asdict(v) for v in report.verdicts],
                    "skipped": list(report.skipped),
                },
                sort_keys=True,
            )
            + "\n"
        )
    else:
        for v in report.verdicts:
            scores = ", ".join(f"{s:.3f}" for s in v.scores) or "-"
            sys.stdout.write(
                f"epoch {report.epoch}  node {v.node}  answered {v.answered}/{v.sent}  scores [{scores}]  "
                f"score {v.score if v.score is not None else '-'}  {'ALARM  ' if v.alarm else ''}{v.outcome}"
                f"{'  evidence ' + v.evidence_hash if v.evidence_hash else ''}\n"
            )
        for node in report.skipped:
            sys.stdout.write(f"epoch {report.epoch}  node {node}  skipped (jailed, unbonding or deregistered)\n")
    sys.stdout.flush()


def run_command(
    model: Annotated[
        Path, typer.Option("--model", envvar="PS_VERIFIER_MODEL", help="The reference model folder (name@revision).")
    ],
    epochs: Annotated[
        int | None, typer.Option("--epochs", envvar="PS_EPOCHS", min=1, help="Epochs to audit (default: until Ctrl-C).")
    ] = None,
    mean_challenges: Annotated[
        float,
        typer.Option("--mean-challenges", envvar="PS_MEAN_CHALLENGES", min=0.1, max=64.0, help="Per node and epoch."),
    ] = 4.0,
    max_prompt_chars: Annotated[
        int,
        typer.Option(
            "--max-prompt-chars",
            envvar="PS_MAX_PROMPT_CHARS",
            min=64,
            max=65_536,
            help="Longest challenge prompt (keep prompt + answer inside the model's context).",
        ),
    ] = 3_600,
    anchor_confirmations: Annotated[
        int,
        typer.Option(
            "--anchor-confirmations",
            envvar="PS_ANCHOR_CONFIRMATIONS",
            min=0,
            max=64,
            help="Blocks mined on top of an epoch's anchor block before it seeds the epoch (a reorg guard).",
        ),
    ] = 2,
    state_dir: StateDir = None,
    db: RegistryIndexDb = None,
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    deployment: DeploymentOpt = None,
    keystore: Keystore = None,
    as_json: JsonOpt = False,
) -> None:
    """Audit every active model node serving MODEL each epoch through the private network, and attest on chain."""
    from cli._client_wallet import make_wallet
    from ledger import Attestations, Indexer, parse_eth
    from node.client import Client, ClientConfig
    from node.client._registry import indexer_sources
    from node.inference import EngineConfig, ModelLoadError, TorchEngine, read_info
    from verifier._runner import Verifier, VerifierConfig, check_verifier

    meta = read_info(model)
    if meta is None:
        raise ModelLoadError(path=str(model), reason="no planetserve.json: build it with `ps-node model make`")
    account = load_operator(keystore)
    dep, registry = open_chain(rpc_url, deployment, None)
    check_verifier(registry, account.address)  # before anything is paid for
    if dep.attestations_address is None:
        from ledger import DeploymentNotFound

        raise DeploymentNotFound(str(deployment or dep.chain_id), "it has no Attestations contract")
    folder = _state_dir(state_dir)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    payer = account
    if os.environ.get("PS_PAYER_KEY"):
        from eth_account import Account

        from ledger import OperatorKeyError

        try:
            payer = Account.from_key(os.environ["PS_PAYER_KEY"].strip())
        except (ValueError, TypeError) as exc:
            raise OperatorKeyError("PS_PAYER_KEY is not a valid 32-byte hex private key") from exc
    else:
        info("warning: audits are funded from the verifier's own key (set PS_PAYER_KEY to an unlinked account)")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("web3", "urllib3", "aiohttp", "asyncio", "ledger", "node"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    w3 = registry.w3
    attestations = Attestations(w3, dep.attestations_address, account)
    wallet = make_wallet(
        rpc_url,
        deployment,
        payer,
        state_dir=folder / "wallet",
        budget_wei=parse_eth(os.environ.get("PS_BUDGET", "0.05"), param="PS_BUDGET"),
        deposit_wei=parse_eth(os.environ.get("PS_DEPOSIT", "0.01"), param="PS_DEPOSIT"),
        fresh_addresses=True,  # a fresh address per channel: no one client address across the audited nodes
    )
    try:
        indexer = Indexer(registry, dep, db or default_index_db(folder, dep.chain_id))
    except BaseException:  # nothing else holds the wallet yet: release its book and locks here
        wallet.close()
        raise
    name = f"{meta.name}@{meta.revision}"

    async def go() -> None:
        engine = TorchEngine.from_folder(model, EngineConfig(device="cpu"))
        try:
            async with Client(directory, ClientConfig(models=(name,)), wallet=wallet) as client:
                verifier = Verifier(
                    VerifierConfig(
                        state_dir=folder,
                        model_dir=model,
                        mean_challenges=mean_challenges,
                        max_prompt_chars=max_prompt_chars,
                        anchor_confirmations=anchor_confirmations,
                    ),
                    account=account,
                    attestations=attestations,
                    nodes=nodes,
                    client=client,
                    engine=engine,
                    model_id=_model_hex(name),
                )
                info(f"verifier {account.address} auditing {name}; state in {folder}")
                await verifier.run(epochs, on_epoch=lambda r: _print_report(r, as_json=as_json))
        finally:
            await engine.close()

    try:
        nodes, directory = indexer_sources(indexer)
        asyncio.run(go())
    finally:
        indexer.close()
        wallet.close()


def _model_hex(name: str) -> str:
    from ledger import model_id

    return str(model_id(name))
