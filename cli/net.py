"""``ps-net``: a whole local PlanetServe network that stays up, and the OpenAI-compatible endpoint in front of it.

``ps-net up`` starts anvil with the contracts, ``--relays`` relays and ``--models`` model nodes as separate
``ps-node serve`` processes, registered and staked from anvil's dev accounts, plus the OpenAI-compatible endpoint
(``ps-client serve``'s app, in this process). It prints the base URL, the accounts it used and how to stop it, then
runs until Ctrl-C or ``ps-net down``, reporting any node that exits. Local use only: the dev keys are public.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from cli._errors import CliError
from cli._main import new_app, run
from cli._node_chain import JsonOpt
from cli._output import emit, info

app = new_app("Run a whole local PlanetServe network (chain, relays, model nodes, OpenAI endpoint).")

DEFAULT_STATE = Path("state") / "net"


class NetworkAlreadyUp(CliError):
    """A ``ps-net up`` is already running from this state directory."""

    code = "cli_network_up"

    def __init__(self, pid: int, state: Path) -> None:
        self.pid = pid
        super().__init__(f"a network is already up from {state} (pid {pid}); run `ps-net down` first")


class NetworkNotUp(CliError):
    """No ``ps-net up`` is running from this state directory."""

    code = "cli_network_not_up"

    def __init__(self, state: Path) -> None:
        super().__init__(f"no network is up from {state}")


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no procfs: trust kill(0)
    return state != "Z"


def _running(state: Path) -> dict[str, Any] | None:
    path = state / "net.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and isinstance(data.get("pid"), int) and _alive(data["pid"]):
        return data
    return None


StateOpt = Annotated[
    Path, typer.Option("--state-dir", envvar="PS_NET_STATE_DIR", help="Where the network keeps state.")
]


@app.callback()
def _root() -> None:
    """Run a whole local PlanetServe network."""


@app.command()
def up(
    relays: Annotated[
        int, typer.Option("--relays", envvar="PS_NET_RELAYS", min=3, max=32, help="Relay processes.")
    ] = 5,
    models: Annotated[
        int, typer.Option("--models", envvar="PS_NET_MODELS", min=1, max=8, help="Model-node processes.")
    ] = 2,
    model_dir: Annotated[
        Path | None, typer.Option("--model-dir", envvar="PS_MODEL_DIR", help="Model folder (default: the quick model).")
    ] = None,
    chain_port: Annotated[
        int, typer.Option("--chain-port", envvar="PS_CHAIN_PORT", min=0, max=65535, help="anvil's port (0: any).")
    ] = 0,
    openai_port: Annotated[
        int, typer.Option("--openai-port", envvar="PS_OPENAI_PORT", min=0, max=65535, help="The OpenAI endpoint.")
    ] = 8080,
    show_dev_keys: Annotated[
        bool, typer.Option("--show-dev-keys", envvar="PS_SHOW_DEV_KEYS", help="Print the dev accounts' keys.")
    ] = False,
    state: StateOpt = DEFAULT_STATE,
    as_json: JsonOpt = False,
) -> None:
    """Start the network and keep it up until Ctrl-C or ``ps-net down``."""
    from ledger import Anvil, AnvilConfig, RegistryParams, deploy_all, dev_account
    from node.inference import ensure_model, read_info
    from node.inference._training import QUICK
    from node.testing import ProcessNetwork, network_specs

    existing = _running(state)
    if existing is not None:
        raise NetworkAlreadyUp(int(existing["pid"]), state)
    state.mkdir(parents=True, exist_ok=True)
    if model_dir is None:
        model_dir = ensure_model(QUICK, Path("build") / "models", progress=info)
    model_info = read_info(model_dir)
    if model_info is None:
        raise CliError(f"{model_dir} is not a model folder (no planetserve.json); build one with `ps-node model make`")
    model = f"{model_info.name}@{model_info.revision}"
    specs = network_specs(relays=relays, model_nodes=models)
    anvil = Anvil(AnvilConfig(port=chain_port, accounts=len(specs) + 4)).start()
    network: ProcessNetwork | None = None
    try:
        deployment_path = state / "deployment.json"
        deployment = deploy_all(anvil.web3(), dev_account(0), RegistryParams(), path=deployment_path)
        info(f"chain {anvil.rpc_url}: contracts deployed (registry {deployment.registry_address})")
        network = ProcessNetwork(
            rpc_url=anvil.rpc_url,
            deployment=deployment_path,
            state_root=state / "nodes",
            nodes=specs,
            model_dir=model_dir,
        )
        info(f"starting {models} model node(s) and {relays} relays as separate processes…")
        nodes = network.start()
        asyncio.run(
            _serve(
                network=network,
                payer=len(specs) + 1,
                rpc_url=anvil.rpc_url,
                deployment=deployment_path,
                state=state,
                model=model,
                openai_port=openai_port,
                show_dev_keys=show_dev_keys,
                as_json=as_json,
                nodes=[
                    {
                        "name": n.spec.name,
                        "role": n.spec.role,
                        "operator": n.operator,
                        "endpoint": n.endpoint,
                        "pid": n.proc.pid,
                        **({"dev_key": _dev_key(n.spec.account_index)} if show_dev_keys else {}),
                    }
                    for n in nodes
                ],
            )
        )
    finally:
        if network is not None:
            network.stop()
        anvil.stop()
        (state / "net.json").unlink(missing_ok=True)
        info("network stopped")


def _dev_key(index: int) -> str:
    from ledger import dev_account

    return "0x" + bytes(dev_account(index).key).hex()


def _dev_address(index: int) -> str:
    from ledger import dev_account

    return str(dev_account(index).address)


def _dev_wallet(rpc_url: str, deployment: Path, payer: int) -> Any:
    """The endpoint's wallet: dev account ``payer`` pays the model nodes (their registered price), 0.05 ETH per
    channel within 0.5 ETH; its book lives as long as the process (the network's chain does too)."""
    from cli._client_wallet import make_wallet
    from ledger import dev_account

    return make_wallet(
        rpc_url, deployment, dev_account(payer), state_dir=None, budget_wei=5 * 10**17, deposit_wei=5 * 10**16
    )


async def _serve(
    *,
    network: Any,
    payer: int,
    rpc_url: str,
    deployment: Path,
    state: Path,
    model: str,
    openai_port: int,
    show_dev_keys: bool,
    as_json: bool,
    nodes: list[dict[str, Any]],
) -> None:
    from aiohttp import web

    from node.client import Client, ClientConfig, ClientService, create_openai_app, load_tokenizer
    from node.client._registry import RegistryDirectory

    # Everything opened here is closed however the endpoint ends, also when it never listened (a taken port):
    # last opened first, each whatever the others raise.
    async with contextlib.AsyncExitStack() as closers:
        directory = RegistryDirectory(
            rpc_url, deployment=deployment, db_url=f"sqlite:///{state / 'client-index.sqlite'}"
        )
        closers.callback(directory.close)
        wallet = _dev_wallet(rpc_url, deployment, payer)
        closers.push_async_callback(asyncio.to_thread, wallet.close)  # its queued book writes run, off the loop
        # The model's own tokenizer: the client hashes each prompt's chunks locally for prefix affinity.
        client = Client(
            directory,
            ClientConfig(models=(model,)),
            tokenizer=load_tokenizer(network.model_dir) if network.model_dir is not None else None,
            reputation=directory.reputation,
            wallet=wallet,
        )
        closers.push_async_callback(client.close)
        service = ClientService(client)
        await service.refresh()
        runner = web.AppRunner(create_openai_app(service), access_log=None)
        await runner.setup()
        closers.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, "127.0.0.1", openai_port)
        await site.start()
        host, port = runner.addresses[0][:2]
        base_url = f"http://{host}:{port}/v1"
        summary = {
            "base_url": base_url,
            "model": model,
            "rpc_url": rpc_url,
            "deployment": str(deployment),
            "nodes": nodes,
            "stop": "Ctrl-C, or `ps-net down`",
            "dev_accounts": "anvil's public test mnemonic: local use only"
            + ("" if show_dev_keys else " (--show-dev-keys)"),
            "paid_by": f"{_dev_address(payer)} (dev account {payer}) pays every request through the endpoint",
        }
        (state / "net.json").write_text(json.dumps({"pid": os.getpid(), **summary}, indent=2) + "\n")
        emit(
            summary if as_json else {k: v for k, v in summary.items() if k != "nodes"},
            as_json=as_json,
            title="network up",
        )
        if not as_json:
            emit([{k: str(v) for k, v in n.items()} for n in nodes], as_json=False, title="nodes")
            info(f"try: curl {base_url}/models")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        reported: set[str] = set()

        def report_crashes() -> None:
            for node in network.crashed():
                if node.spec.name not in reported:
                    reported.add(node.spec.name)
                    info(f"{node.spec.name} exited with code {node.proc.returncode}; the network runs on without it")

        try:
            while not stop.is_set():
                report_crashes()
                try:
                    async with asyncio.timeout(1.0):
                        await stop.wait()
                except TimeoutError:
                    await service.refresh()
        finally:
            report_crashes()  # a node that died in the last second before the stop is reported too


@app.command()
def down(state: StateOpt = DEFAULT_STATE, as_json: JsonOpt = False) -> None:
    """Stop the network that ``ps-net up`` runs from ``--state-dir``."""
    running = _running(state)
    if running is None:
        raise NetworkNotUp(state)
    pid = int(running["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    emit({"stopped": not _alive(pid), "pid": pid}, as_json=as_json, title="ps-net down")


@app.command()
def status(state: StateOpt = DEFAULT_STATE, as_json: JsonOpt = False) -> None:
    """Show the network that ``ps-net up`` runs from ``--state-dir``."""
    running = _running(state)
    if running is None:
        raise NetworkNotUp(state)
    nodes = [{**n, "alive": _alive(int(n["pid"]))} for n in running.get("nodes", [])]
    if as_json:
        emit({**running, "nodes": nodes}, as_json=True)
        return
    emit({k: v for k, v in running.items() if k != "nodes"}, as_json=False, title="network")
    emit([{k: str(v) for k, v in n.items()} for n in nodes], as_json=False, title="nodes")


main = run(app)
