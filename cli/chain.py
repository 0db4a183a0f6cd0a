"""``ps-chain``: run a local chain with PlanetServe's contracts deployed.

The ledger (web3) is imported inside the commands: it takes about two seconds, which ``--help`` need not pay.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from cli._main import new_app, run
from cli._output import emit, info

app = new_app("Run a local PlanetServe chain (anvil) and deploy the contracts.", root=True)


@app.command()
def up(
    port: Annotated[int, typer.Option("--port", envvar="PS_CHAIN_PORT", min=0, max=65535, help="0 picks one.")] = 8545,
    state_dir: Annotated[
        Path | None,
        typer.Option("--state-dir", envvar="PS_CHAIN_STATE_DIR", help="Persist the chain here across restarts."),
    ] = None,
    deployment: Annotated[
        Path | None, typer.Option("--deployment", envvar="PS_DEPLOYMENT", help="Where to write the deployment file.")
    ] = None,
    min_stake_model: Annotated[str, typer.Option(help="Minimum model-node stake, ETH.")] = "1",
    min_stake_relay: Annotated[str, typer.Option(help="Minimum relay stake, ETH.")] = "0.1",
    min_stake_verifier: Annotated[str, typer.Option(help="Minimum verifier stake, ETH.")] = "1",
    unbonding_delay: Annotated[int, typer.Option(min=0, help="Unbonding delay, seconds.")] = 86_400,
    as_json: Annotated[bool, typer.Option("--json", envvar="PS_JSON", help="Print JSON on stdout.")] = False,
) -> None:
    """Start anvil, deploy the contracts, print where they are, and run until Ctrl-C or SIGTERM."""
    from ledger import (
        Anvil,
        AnvilConfig,
        ChainError,
        RegistryParams,
        Wei,
        default_deployment_path,
        deploy_all,
        dev_account,
        load_deployment,
        parse_eth,
    )

    params = RegistryParams(
        minimum_stake_model=Wei(parse_eth(min_stake_model, param="min-stake-model")),
        minimum_stake_relay=Wei(parse_eth(min_stake_relay, param="min-stake-relay")),
        minimum_stake_verifier=Wei(parse_eth(min_stake_verifier, param="min-stake-verifier")),
        unbonding_delay=unbonding_delay,
    )
    state_file = None if state_dir is None else state_dir / "anvil-state.json"
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, _on_signal)
    try:
        with Anvil(AnvilConfig(port=port, state_file=state_file)) as anvil:
            w3 = anvil.web3()
            chain_id = w3.eth.chain_id
            path = deployment or default_deployment_path(chain_id)
            dep = None
            if state_file is not None and path.exists():
                try:
                    dep = load_deployment(path)
                    dep.verify(w3)
                    info(f"reusing deployment {path}")
                except ChainError:
                    dep = None
            if dep is None:
                dep = deploy_all(w3, dev_account(0), params, path=path)
                info(f"deployed NodeRegistry at {dep.registry_address}")
            emit(
                {
                    "rpc_url": anvil.rpc_url,
                    "chain_id": chain_id,
                    "deployment": str(path),
                    "contracts": {name: rec.address for name, rec in dep.contracts.items()},
                    "deploy_block": dep.deploy_block,
                    "dev_accounts": anvil.dev_addresses(),
                    "state_file": None if state_file is None else str(state_file),
                },
                as_json=as_json,
                title="PlanetServe chain",
            )
            info("dev account keys are anvil's public test mnemonic; never use them on a real chain")
            info("running; Ctrl-C or SIGTERM stops the chain")
            try:
                while not stop.wait(0.5):
                    pass
            except KeyboardInterrupt:
                pass
            info("stopping anvil")
    finally:
        signal.signal(signal.SIGTERM, previous)


@app.command()
def advance(
    seconds: Annotated[int, typer.Argument(min=0, help="Seconds to move the chain's clock forward.")],
    rpc_url: Annotated[str, typer.Option("--rpc-url", envvar="PS_RPC_URL")] = "http://127.0.0.1:8545",
) -> None:
    """Move a local anvil chain's time forward and mine a block (e.g. to pass the unbonding delay)."""
    from ledger import connect

    w3 = connect(rpc_url)
    w3.provider.make_request("evm_increaseTime", [seconds])  # type: ignore[arg-type]
    w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
    info(f"advanced {seconds} s; head block {w3.eth.block_number}")


main = run(app)
