"""``ps-node serve``: run the node's overlay process, as a relay or as a model node with an inference engine.

The node's X25519 key comes from its state directory (the same key ``ps-node register`` put on chain). Once it listens,
the command prints the endpoint, public key and (model nodes) model id, on stdout as JSON with ``--json`` so that
scripts can wait for it; then it serves until SIGINT or SIGTERM and shuts down cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli._errors import PortInUse
from cli._main import new_app
from cli._node_chain import DEFAULT_RPC_URL, DeploymentOpt, JsonOpt, RpcUrl, StateDir, state_dir_or_default
from cli._node_reforward import (
    DEFAULT_BUDGET_ETH,
    DEFAULT_DEPOSIT_ETH,
    BudgetOpt,
    DepositOpt,
    MaxPriceOpt,
    node_reforward,
    parse_amounts,
)
from cli._output import emit, info

if TYPE_CHECKING:
    from node.overlay._redeemer import RedeemerConfig
from node import NodeIdentity, OnionKeyStore
from node.inference import ENGINE_KINDS, EngineConfig, InvalidParams, load_engine

app = new_app("Serve the overlay.")


@app.command()
def serve(
    role: Annotated[str, typer.Option("--role", envvar="PS_ROLE", help="relay or model.")] = "relay",
    host: Annotated[str, typer.Option("--host", envvar="PS_HOST", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", envvar="PS_PORT", help="Port to listen on (0: any free port).")] = 8700,
    dial_private: Annotated[
        bool | None,
        typer.Option(
            "--dial-private-addresses/--no-dial-private-addresses",
            envvar="PS_DIAL_PRIVATE_ADDRESSES",
            help="Whether next hops and peers may be loopback/private addresses (default: yes only when --host is "
            "loopback or private; a node serving the internet must not let registrants point it at its own network).",
            show_default=False,
        ),
    ] = None,
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
    reforward_bound: Annotated[
        int | None,
        typer.Option(
            "--reforward-bound",
            envvar="PS_REFORWARD_BOUND",
            min=0,
            help="Model nodes: re-forward a request once to a peer serving the same model when more than this "
            "many wait in the engine (protocol §10.5; needs the operator key). Off when not set.",
        ),
    ] = None,
    reforward_budget: BudgetOpt = DEFAULT_BUDGET_ETH,
    reforward_deposit: DepositOpt = DEFAULT_DEPOSIT_ETH,
    reforward_max_price: MaxPriceOpt = None,
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    deployment: DeploymentOpt = None,
    registry_refresh: Annotated[
        float,
        typer.Option(
            "--registry-refresh", envvar="PS_REGISTRY_REFRESH", min=1.0, help="Seconds between registry reads."
        ),
    ] = 15.0,
    redeem_interval: Annotated[
        float,
        typer.Option(
            "--redeem-interval",
            envvar="PS_REDEEM_INTERVAL",
            min=1.0,
            help="Paid model nodes: seconds between scheduled redeems of the voucher book.",
        ),
    ] = 3_600.0,
    redeem_min_wei: Annotated[
        int | None,
        typer.Option(
            "--redeem-min-wei",
            envvar="PS_REDEEM_MIN_WEI",
            min=1,
            help="Least unredeemed wei a channel needs to be redeemed on schedule (closing channels: always; "
            "default 10^15, see docs/payments.md).",
        ),
    ] = None,
    redeem_close_check: Annotated[
        float,
        typer.Option(
            "--redeem-close-check",
            envvar="PS_REDEEM_CLOSE_CHECK",
            min=0.1,
            help="Seconds between reads of the chain for closing channels (redeemed at once).",
        ),
    ] = 30.0,
    redeem_margin: Annotated[
        float,
        typer.Option(
            "--redeem-margin",
            envvar="PS_REDEEM_MARGIN",
            min=0.0,
            help="Seconds before a close deadline by which a closing channel should be redeemed.",
        ),
    ] = 600.0,
    state_dir: StateDir = None,
    as_json: JsonOpt = False,
) -> None:
    """Serve as a relay, or as a model node answering completions from an inference engine.

    The node forwards packets only to nodes it finds routable in the registry (read from ``--rpc-url`` into an
    index in the state directory, refreshed every ``--registry-refresh`` seconds).
    """
    from node.overlay import OverlayConfig, create_app  # aiohttp: only when actually serving
    from node.overlay._dialing import dial_private_by_default
    from node.overlay._serve import create_model_app, registry_peer_directory, serve_until

    logging.basicConfig(level=os.environ.get("PS_LOG_LEVEL", "WARNING"), format="%(levelname)s %(name)s %(message)s")
    if role not in ("relay", "model"):
        raise InvalidParams(param="role", value=role, reason="relay or model")
    if not (0 <= port <= 65535):
        raise InvalidParams(param="port", value=port, reason="0..65535")
    if reforward_bound is not None:
        parse_amounts(reforward_budget, reforward_deposit)  # a malformed amount fails before the model loads
    if port and not _port_free(host, port):  # before a model load that could take a while
        raise PortInUse(host=host, port=port, hint="choose another --port, or stop what listens there")
    state = state_dir_or_default(state_dir)
    identity = NodeIdentity.load_or_create(state)
    dial_private_addresses = dial_private if dial_private is not None else dial_private_by_default(host)
    config = OverlayConfig(
        dial_private_addresses=dial_private_addresses,
        x25519_secret=identity.private_key,
        role="model" if role == "model" else "relay",
        replay_journal=state / "replay.journal",
        onion_keyring=OnionKeyStore(state).keyring(),  # reloaded every 2 s: `ps-node keys rotate` needs no restart
    )
    # Everything opened from here on is closed on every path out of the command, also when the node never serves
    # (a model that fails to load, a taken port): each close is idempotent, and when the node served, the app's
    # cleanup has closed most of them already. Closed last-opened first, whatever one of them raises.
    closers = contextlib.AsyncExitStack()
    started = False
    try:
        peers = registry_peer_directory(
            rpc_url, deployment, f"sqlite:///{state / 'registry-index.sqlite'}", refresh_interval_s=registry_refresh
        )
        closers.callback(peers.close)
        ready: dict[str, Any] = {
            "role": role,
            "x25519_public_key": "0x" + identity.public_key.hex(),
            "dial_private_addresses": dial_private_addresses,
        }
        if role == "model":
            if model_dir is None:
                raise InvalidParams(param="model_dir", value=None, reason="a model node needs --model-dir")
            engine_config = EngineConfig(device=device or "auto", max_queue=max_queue)
            loaded = load_engine(engine, model_dir, engine_config, upstream=upstream)
            closers.push_async_callback(loaded.close)
            ready.update(engine=type(loaded).__name__, model_id=loaded.model_id)
            heartbeat = _heartbeat_publisher(loaded)
            from node.overlay._redeemer import DEFAULT_MIN_WORTH_WEI, RedeemerConfig  # web3: only for model nodes

            redeem = RedeemerConfig(
                interval_s=redeem_interval,
                min_worth_wei=DEFAULT_MIN_WORTH_WEI if redeem_min_wei is None else redeem_min_wei,
                close_check_s=redeem_close_check,
                deadline_margin_s=redeem_margin,
            )
            payments, redeemer, close_book = _payments(rpc_url, deployment, state, loaded, redeem)
            closers.callback(close_book)
            ready["heartbeats"] = heartbeat is not None
            ready["payments"] = "the registered price" if payments is not None else "free (no operator key)"
            reforward = node_reforward(
                reforward_bound,
                rpc_url,
                deployment,
                state,
                loaded,
                budget_eth=reforward_budget,
                deposit_eth=reforward_deposit,
                max_peer_price=reforward_max_price,
                dial_private_addresses=dial_private_addresses,
            )
            if reforward is not None:
                closers.push_async_callback(reforward.close)
            ready["reforward"] = "off" if reforward is None else reforward.describe()
            application = create_model_app(
                config,
                loaded,
                peers=peers,
                heartbeat=heartbeat,
                payments=payments,
                reforward=None if reforward is None else reforward.reforwarder,
            )
            if reforward is not None:
                application.cleanup_ctx.append(reforward.cleanup_ctx())
            application.cleanup_ctx.append(_closing_ctx(close_book))  # exits after the redeemer's (listed after)
            if redeemer is not None:
                from node.overlay import keys
                from node.overlay._redeemer import RedeemerCollector

                application.cleanup_ctx.append(redeemer.cleanup_ctx)
                application[keys.NODE_METRICS].registry.register(RedeemerCollector(redeemer))
        else:
            application = create_app(config, peers=peers)
            application.cleanup_ctx.append(peers.cleanup_ctx())

        def on_ready(endpoint: str) -> None:
            ready["endpoint"] = endpoint
            emit(ready, as_json=as_json, title="serving")
            if not as_json:
                info("press Ctrl-C to stop")

        async def main() -> None:
            try:
                stop = asyncio.Event()
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(sig, stop.set)
                await serve_until(application, host=host, port=port, stop=stop, on_ready=on_ready)
            finally:
                await closers.aclose()

        started = True
        try:
            asyncio.run(main())
        except OSError as exc:
            # The bind itself is the authority (the check above can race with another process).
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(host=host, port=port, hint="choose another --port, or stop what listens there") from exc
            if exc.errno == errno.EADDRNOTAVAIL:
                raise InvalidParams(param="host", value=host, reason="not an address of this machine") from exc
            raise
    finally:
        if not started:
            _close_unstarted(closers)
    info("stopped")


def _closing_ctx(close: Any) -> Any:
    """An aiohttp cleanup context running ``close()`` when the node stops."""

    async def ctx(_app: Any) -> Any:
        yield
        close()

    return ctx


def _close_unstarted(closers: contextlib.AsyncExitStack) -> None:
    """Close what a node that never served opened. A failure here is logged, not raised: the error that stopped the
    node (e.g. its model failed to load) is the one to report."""
    try:
        asyncio.run(closers.aclose())
    except Exception as exc:  # the command's own error is already on its way out
        logging.getLogger(__name__).warning("closing after a failed start: %s", type(exc).__name__)


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


def _payments(
    rpc_url: str, deployment: Path | None, state: Path, engine: Any, redeem: RedeemerConfig
) -> tuple[Any, Any, Callable[[], None]]:
    """A model node charges the price it registered on chain (read every 15 s; free while unregistered or at 0),
    with its voucher book in the state directory, and redeems that book in the background (on a schedule and before
    close deadlines: ``node/overlay/_redeemer.py``). Needs the operator key. Returns the gate and the redeemer
    service, both None without a key, and the function closing the book (idempotent; the book refuses use after).
    The gate and the redeemer share one store (one per process: its lock serialises the book's writes)."""
    if not os.environ.get("PS_PRIVATE_KEY"):
        return None, None, lambda: None
    import threading

    from cli._node_chain import NodeChain, load_operator, open_node_chain
    from cli._node_pay import node_voucher_store
    from ledger import ChainError, PaymentChannels, VoucherStore
    from node.overlay._payments import RegistryPricedGate
    from node.overlay._redeemer import Redeemer, RedeemerService

    operator = load_operator(None).address
    lock = threading.Lock()
    opened: dict[str, tuple[NodeChain, VoucherStore, PaymentChannels]] = {}

    closed: list[bool] = []

    def book() -> tuple[NodeChain, VoucherStore, PaymentChannels]:
        with lock:  # first use comes from the gate's or the redeemer's worker thread, whichever is first
            if closed:
                raise ChainError("the node's voucher book is closed (the node is stopping)")
            if "book" not in opened:
                chain = open_node_chain(rpc_url, deployment, None)
                store, pay, _ = node_voucher_store(chain, state, None)
                opened["book"] = (chain, store, pay)
            return opened["book"]

    def price() -> int:
        node = book()[0].registry.get_node(operator)
        return 0 if node is None else int(node.price_per_1k_tokens)

    def close() -> None:
        with lock:
            closed.append(True)
            entry = opened.pop("book", None)
        if entry is not None:
            entry[1].close()

    gate = RegistryPricedGate(store=lambda: book()[1], price=price, tokenize=engine.tokenize)
    service = RedeemerService(lambda: Redeemer(book()[1], book()[2], redeem), redeem)
    return gate, service, close


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
