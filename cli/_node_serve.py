"""``ps-node serve``: run the node's overlay process, as a relay or as a model node with an inference engine.

The node's X25519 key comes from its state directory (the same key ``ps-node register`` put on chain). Once it listens,
the command prints the endpoint, public key and (model nodes) model id, on stdout as JSON with ``--json`` so that
scripts can wait for it; then it serves until SIGINT or SIGTERM and shuts down cleanly.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Annotated, Any

import typer

from cli._errors import PortInUse
from cli._main import new_app
from cli._node_chain import DEFAULT_RPC_URL, DeploymentOpt, JsonOpt, RpcUrl, StateDir, state_dir_or_default
from cli._output import emit, info
from node import NodeIdentity, OnionKeyStore
from node.inference import ENGINE_KINDS, EngineConfig, InvalidParams, load_engine

app = new_app("Serve the overlay.")


@app.command()
def serve(
    role: Annotated[str, typer.Option("--role", envvar="PS_ROLE", help="relay or model.")] = "relay",
    host: Annotated[str, typer.Option("--host", envvar="PS_HOST", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", envvar="PS_PORT", help="Port to listen on (0: any free port).")] = 8700,
    engine: Annotated[
        str, typer.Option("--engine", envvar="PS_ENGINE", help=f"Model nodes: {'|'.join(ENGINE_KINDS)}.")
    ] = "auto",
    model_dir: Annotated[
        Path | None, typer.Option("--model-dir", envvar="PS_MODEL_DIR", help="Model nodes: the model folder.")
    ] = None,
    device: Annotated[
        str | None, typer.Option("--device", envvar="PS_DEVICE", help="torch engine: cpu or cuda (default: auto).")
    ] = None,
    max_queue: Annotated[
        int, typer.Option("--max-queue", envvar="PS_MAX_QUEUE", help="Requests waiting before 'overloaded'.")
    ] = 64,
    upstream: Annotated[
        str | None,
        typer.Option("--upstream", envvar="PS_UPSTREAM", help="openai-http engine: the OpenAI-compatible server URL."),
    ] = None,
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    deployment: DeploymentOpt = None,
    registry_refresh: Annotated[
        float,
        typer.Option(
            "--registry-refresh", envvar="PS_REGISTRY_REFRESH", min=1.0, help="Seconds between registry reads."
        ),
    ] = 15.0,
    state_dir: StateDir = None,
    as_json: JsonOpt = False,
) -> None:
    """Serve as a relay, or as a model node answering completions from an inference engine.

    The node forwards packets only to nodes it finds routable in the registry (read from ``--rpc-url`` into an
    index in the state directory, refreshed every ``--registry-refresh`` seconds).
    """
    from node.overlay import OverlayConfig, create_app  # aiohttp: only when actually serving
    from node.overlay._serve import create_model_app, registry_peer_directory, serve_until

    logging.basicConfig(level=os.environ.get("PS_LOG_LEVEL", "WARNING"), format="%(levelname)s %(name)s %(message)s")
    if role not in ("relay", "model"):
        raise InvalidParams(param="role", value=role, reason="relay or model")
    if not (0 <= port <= 65535):
        raise InvalidParams(param="port", value=port, reason="0..65535")
    if port and not _port_free(host, port):  # before a model load that could take a while
        raise PortInUse(host=host, port=port, hint="choose another --port, or stop what listens there")
    state = state_dir_or_default(state_dir)
    identity = NodeIdentity.load_or_create(state)
    config = OverlayConfig(
        x25519_secret=identity.private_key,
        role="model" if role == "model" else "relay",
        replay_journal=state / "replay.journal",
        onion_keyring=OnionKeyStore(state).keyring(),  # reloaded every 2 s: `ps-node keys rotate` needs no restart
    )
    peers = registry_peer_directory(
        rpc_url, deployment, f"sqlite:///{state / 'registry-index.sqlite'}", refresh_interval_s=registry_refresh
    )
    ready: dict[str, Any] = {"role": role, "x25519_public_key": "0x" + identity.public_key.hex()}
    if role == "model":
        if model_dir is None:
            raise InvalidParams(param="model_dir", value=None, reason="a model node needs --model-dir")
        engine_config = EngineConfig(device=device or "auto", max_queue=max_queue)
        loaded = load_engine(engine, model_dir, engine_config, upstream=upstream)
        ready.update(engine=type(loaded).__name__, model_id=loaded.model_id)
        heartbeat = _heartbeat_publisher(loaded)
        payments = _payments(rpc_url, deployment, state, loaded)
        ready["heartbeats"] = heartbeat is not None
        ready["payments"] = "the registered price" if payments is not None else "free (no operator key)"
        application = create_model_app(config, loaded, peers=peers, heartbeat=heartbeat, payments=payments)
    else:
        application = create_app(config, peers=peers)
        application.cleanup_ctx.append(peers.cleanup_ctx())

    def on_ready(endpoint: str) -> None:
        ready["endpoint"] = endpoint
        emit(ready, as_json=as_json, title="serving")
        if not as_json:
            info("press Ctrl-C to stop")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve_until(application, host=host, port=port, stop=stop, on_ready=on_ready)

    try:
        asyncio.run(main())
    except OSError as exc:
        # The bind itself is the authority (the check above can race with another process).
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(host=host, port=port, hint="choose another --port, or stop what listens there") from exc
        if exc.errno == errno.EADDRNOTAVAIL:
            raise InvalidParams(param="host", value=host, reason="not an address of this machine") from exc
        raise
    info("stopped")


def _heartbeat_publisher(engine: Any) -> Any:
    """The model node's signed heartbeats, when the operator key is in the environment (``PS_PRIVATE_KEY`` or
    ``--keystore`` via ``ps-node``'s usual rules); without it the node serves but clients see no load or cache."""
    from node.inference._prefix import chunk_hashes
    from node.overlay._heartbeat import HeartbeatPublisher

    if not os.environ.get("PS_PRIVATE_KEY"):
        info("no PS_PRIVATE_KEY: this model node publishes no heartbeats (clients route to it blind)")
        return None
    from cli._node_chain import load_operator

    tokenize = getattr(engine, "tokenize", None)
    return HeartbeatPublisher(
        account=load_operator(None),
        model_id=engine.model_id,
        stats=engine.stats,
        prefix_hashes=(lambda prompt: chunk_hashes(tokenize(prompt))) if callable(tokenize) else None,
    )


def _payments(rpc_url: str, deployment: Path | None, state: Path, engine: Any) -> Any:
    """A model node charges the price it registered on chain (read every 15 s; free while unregistered or at 0),
    with its voucher book in the state directory. Needs the operator key, which ``ps-node claim`` redeems with."""
    if not os.environ.get("PS_PRIVATE_KEY"):
        return None
    from cli._node_chain import load_operator, open_chain
    from cli._node_pay import open_voucher_store
    from node.overlay._payments import RegistryPricedGate

    operator = load_operator(None).address

    def price() -> int:
        node = open_chain(rpc_url, deployment, None)[1].get_node(operator)
        return 0 if node is None else int(node.price_per_1k_tokens)

    return RegistryPricedGate(
        store=lambda: open_voucher_store(rpc_url, deployment, state, None, operator)[0],
        price=price,
        tokenize=engine.tokenize,
    )


def _port_free(host: str, port: int) -> bool:
    """Whether ``host:port`` can be bound now (``SO_REUSEADDR``, as aiohttp binds, so TIME_WAIT counts as free)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.errno != errno.EADDRINUSE
        return True
