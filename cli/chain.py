"""``ps-chain``: run a local chain with PlanetServe's contracts deployed.

The ledger (web3) is imported inside the commands: it takes about two seconds, which ``--help`` need not pay.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer

from cli._main import new_app, run
from cli._output import emit, info

app = new_app("Run a local PlanetServe chain (anvil) and deploy the contracts.", root=True)


#: Shown next to every dev key, in both output forms.
DEV_KEY_WARNING = "DEV ONLY: anvil's public test mnemonic; anyone can spend from it; never use on a real chain"


def _probe_port(port: int) -> tuple[int, str] | None:
    """The (chain id, client version) of a JSON-RPC chain answering on 127.0.0.1:``port``, or None if none does."""
    import requests
    from web3 import HTTPProvider, Web3

    w3 = Web3(HTTPProvider(f"http://127.0.0.1:{port}", request_kwargs={"timeout": 2.0}))
    try:
        return int(w3.eth.chain_id), str(w3.client_version)
    except (requests.RequestException, OSError, ValueError):
        return None


def _dev_keys(count: int) -> list[dict[str, Any]]:
    from ledger import dev_account

    keys = []
    for index in range(count):
        account = dev_account(index)
        keys.append(
            {
                "index": index,
                "address": account.address,
                "private_key": "0x" + bytes(account.key).hex(),
                "dev_only": True,
            }
        )
    return keys


def _summary(
    *, rpc_url: str, chain_id: int, path: Path, dep: Any, dev_accounts: list[str], state_file: Path | None, reused: bool
) -> dict[str, Any]:
    return {
        "rpc_url": rpc_url,
        "chain_id": chain_id,
        "deployment": str(path),
        "contracts": {name: rec.address for name, rec in dep.contracts.items()},
        "deploy_block": dep.deploy_block,
        "dev_accounts": dev_accounts,
        "state_file": None if state_file is None else str(state_file),
        "reused": reused,
    }


def _print(summary: dict[str, Any], dev_keys: list[dict[str, Any]] | None, *, as_json: bool) -> None:
    if as_json:
        emit(summary | ({"dev_keys": dev_keys, "dev_keys_warning": DEV_KEY_WARNING} if dev_keys else {}), as_json=True)
        return
    rows = {k: v for k, v in summary.items() if k not in ("contracts", "dev_accounts")}
    rows.update({f"contract {name}": address for name, address in summary["contracts"].items()})
    if not dev_keys:
        rows.update({f"dev account {i}": address for i, address in enumerate(summary["dev_accounts"])})
    emit(rows, as_json=False, title="PlanetServe chain")
    if dev_keys:
        # Plain lines, not table cells: a table truncates a 66-character key to the terminal width, uncopyable.
        for key in dev_keys:
            print(f"dev key {key['index']}: {key['address']} {key['private_key']}  (dev only)")
        info(DEV_KEY_WARNING)


def _reuse(port: int, chain_id: int, deployment: Path | None, show_dev_keys: bool, as_json: bool) -> None:
    """Print the running chain's deployment (verified against it) instead of starting or deploying anything."""
    from ledger import ANVIL_CHAIN_ID, connect, default_deployment_path, load_deployment

    rpc_url = f"http://127.0.0.1:{port}"
    w3 = connect(rpc_url, timeout=5.0)
    path = deployment or default_deployment_path(chain_id)
    dep = load_deployment(path)
    dep.verify(w3)  # WrongChainId / DeploymentNotFound: the file is not this chain's; nothing is deployed then
    anvil = chain_id == ANVIL_CHAIN_ID and str(w3.client_version).lower().startswith("anvil")
    if show_dev_keys and not anvil:
        from ledger import InvalidChainInput

        raise InvalidChainInput("show-dev-keys", True, f"the chain at {rpc_url} is not a local anvil")
    accounts = [str(a) for a in w3.eth.accounts] if anvil else []
    summary = _summary(
        rpc_url=rpc_url, chain_id=chain_id, path=path, dep=dep, dev_accounts=accounts, state_file=None, reused=True
    )
    _print(summary, _dev_keys(len(accounts)) if show_dev_keys else None, as_json=as_json)
    info(f"reusing the chain already running at {rpc_url} (deployment {path}); nothing was started or deployed")


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
    reuse: Annotated[
        bool,
        typer.Option(
            "--reuse",
            envvar="PS_CHAIN_REUSE",
            help="If a chain already runs on --port, print its (verified) deployment and exit instead of refusing.",
        ),
    ] = False,
    show_dev_keys: Annotated[
        bool,
        typer.Option(
            "--show-dev-keys",
            envvar="PS_SHOW_DEV_KEYS",
            help="Also print the dev accounts' private keys (anvil's public test keys; dev only).",
        ),
    ] = False,
    min_stake_model: Annotated[
        str, typer.Option(envvar="PS_MIN_STAKE_MODEL", help="Minimum model-node stake, ETH.")
    ] = "1",
    min_stake_relay: Annotated[
        str, typer.Option(envvar="PS_MIN_STAKE_RELAY", help="Minimum relay stake, ETH.")
    ] = "0.1",
    min_stake_verifier: Annotated[
        str, typer.Option(envvar="PS_MIN_STAKE_VERIFIER", help="Minimum verifier stake, ETH.")
    ] = "1",
    unbonding_delay: Annotated[
        int, typer.Option(envvar="PS_UNBONDING_DELAY", min=0, help="Unbonding delay, seconds.")
    ] = 86_400,
    block_time: Annotated[
        int,
        typer.Option(
            envvar="PS_BLOCK_TIME",
            min=0,
            max=3600,
            help="Also mine a block every this many seconds (0: only on transactions; verifiers need blocks).",
        ),
    ] = 0,
    as_json: Annotated[bool, typer.Option("--json", envvar="PS_JSON", help="Print JSON on stdout.")] = False,
) -> None:
    """Start anvil, deploy the contracts, print where they are, and run until Ctrl-C or SIGTERM.

    A chain already running on the port is never redeployed into: the command refuses (exit 10), or with
    ``--reuse`` prints that chain's deployment and exits.
    """
    from cli._errors import PortInUse
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
        port_is_free,
    )

    params = RegistryParams(
        minimum_stake_model=Wei(parse_eth(min_stake_model, param="min-stake-model")),
        minimum_stake_relay=Wei(parse_eth(min_stake_relay, param="min-stake-relay")),
        minimum_stake_verifier=Wei(parse_eth(min_stake_verifier, param="min-stake-verifier")),
        unbonding_delay=unbonding_delay,
    )
    if port and not port_is_free(port):
        running = _probe_port(port)
        if running is None:
            raise PortInUse(host="127.0.0.1", port=port, what="another program (no JSON-RPC chain answers there)")
        if reuse:
            _reuse(port, running[0], deployment, show_dev_keys, as_json)
            return
        raise PortInUse(
            host="127.0.0.1",
            port=port,
            what=f"a running chain (chain id {running[0]}, {running[1]})",
            hint="stop it, choose another --port, or pass --reuse to use its deployment",
        )
    state_file = None if state_dir is None else state_dir / "anvil-state.json"
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, _on_signal)
    try:
        with Anvil(AnvilConfig(port=port, state_file=state_file, block_time_s=block_time)) as anvil:
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
            accounts = [str(a) for a in anvil.dev_addresses()]
            summary = _summary(
                rpc_url=anvil.rpc_url,
                chain_id=chain_id,
                path=path,
                dep=dep,
                dev_accounts=accounts,
                state_file=state_file,
                reused=False,
            )
            _print(summary, _dev_keys(len(accounts)) if show_dev_keys else None, as_json=as_json)
            if not show_dev_keys:
                info("dev account keys: `ps-chain up --show-dev-keys` prints them (anvil's public test keys, dev only)")
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
