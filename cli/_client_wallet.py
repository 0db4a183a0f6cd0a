"""``ps-client deposit|channels|close|reclaim``: the client's payment channels, kept in its durable wallet.

Why here and not in ``ask``: the wallet (``node.client._wallet``) opens and tops up channels on its own while paying
for requests; these commands are for the user's own decisions: put money on a channel to a node, see where every
wei stands, start closing, and take back what was not redeemed once the dispute delay is over. ``reclaim`` is its
own command (not ``close --reclaim``): closing and reclaiming are an hour or more apart, and a script runs them from
different places.

Keys only from ``PS_PRIVATE_KEY``. Amounts print in ETH and exact wei. web3 is imported inside the commands.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from platformdirs import user_data_dir

from cli._main import new_app
from cli._node_chain import DEFAULT_RPC_URL, DeploymentOpt, JsonOpt, RpcUrl, chain_now, load_operator, open_chain
from cli._output import emit, info

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

    from node.client._wallet import Wallet
    from node.client._wallet_store import ChannelState

app = new_app("The client's payment channels: deposit, list, close, reclaim.")

ClientStateDir = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        envvar="PS_STATE_DIR",
        help="Client state directory: the wallet's book of channels (default: the user data dir's planetserve/client).",
    ),
]


def client_state_dir(value: Path | None) -> Path:
    """The client state directory: ``--state-dir``/``PS_STATE_DIR``, else ``planetserve/client`` in the user data
    dir (where ``ps-client`` keeps its registry index too); created 0700."""
    folder = value if value is not None else Path(user_data_dir("planetserve")) / "client"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return folder


def make_wallet(
    rpc_url: str,
    deployment: Path | None,
    account: LocalAccount,
    *,
    state_dir: Path | None,
    budget_wei: int,
    deposit_wei: int,
    fresh_addresses: bool = False,
) -> Wallet:
    """A wallet paying from ``account`` on the deployment's ``PaymentChannels``, its book in ``state_dir`` (a
    temporary one removed with it when None). The one way every command builds a wallet."""
    from ledger import PaymentChannels
    from node.client._wallet import Wallet

    dep, registry = open_chain(rpc_url, deployment, None)
    return Wallet(
        PaymentChannels(registry.w3, dep.payments_address),
        account,
        budget_wei=budget_wei,
        deposit_wei=deposit_wei,
        state_dir=state_dir,
        fresh_addresses=fresh_addresses,
    )


def env_wallet(rpc_url: str, deployment: Path | None, state_dir: Path | None) -> Wallet:
    """The wallet of ``PS_PRIVATE_KEY`` with ``PS_BUDGET``/``PS_DEPOSIT``/``PS_FRESH_ADDRESSES``, its book in the
    client state directory."""
    from ledger import parse_eth

    return make_wallet(
        rpc_url,
        deployment,
        load_operator(None),
        state_dir=client_state_dir(state_dir),
        budget_wei=parse_eth(os.environ.get("PS_BUDGET", "0.05"), param="PS_BUDGET"),
        deposit_wei=parse_eth(os.environ.get("PS_DEPOSIT", "0.01"), param="PS_DEPOSIT"),
        fresh_addresses=os.environ.get("PS_FRESH_ADDRESSES", "").lower() in {"1", "true", "yes"},
    )


def _amount(wei: int) -> str:
    from ledger import format_eth

    return f"{format_eth(wei)} ETH ({wei} wei)"


def _row(channel: ChannelState, now: int, *, as_json: bool, payer: str) -> dict[str, Any]:
    from cli._durations import describe_time

    deadline = "" if channel.closes_at == 0 else describe_time(channel.closes_at, now)
    amounts = {
        "deposit": channel.deposit,
        "spent": channel.owed,
        "signed": channel.last,
        "redeemed": channel.redeemed,
        "left": channel.left,
        "in_flight": channel.in_flight,
    }
    if as_json:
        from ledger import format_eth

        row: dict[str, Any] = {
            "channel_id": channel.channel_id,
            "node": channel.node,
            "payer": payer,
            "state": channel.state,
            "closes_at": channel.closes_at,
            "close_deadline": deadline,
            "reclaimable": channel.state == "closing" and 0 < channel.closes_at <= now,
            "recovered": channel.recovered,
        }
        for name, wei in amounts.items():
            row[f"{name}_wei"] = str(wei)
            row[f"{name}_eth"] = format_eth(wei)
        return row
    shown = {"channel": channel.channel_id, "node": channel.node, "state": channel.state}
    shown.update({name: _amount(wei) for name, wei in amounts.items() if name != "in_flight"})
    if channel.recovered:  # rebuilt from the chain: the book's signed/spent are bounds, not what was signed
        shown["spent"] = "unknown (recovered)"
        shown["signed"] = f"unknown, at most {_amount(channel.deposit)}"
    shown["close deadline"] = deadline or "-"
    return shown


def _payer(wallet: Wallet, channel: ChannelState) -> str:
    return str(wallet.signer_address(channel))


@app.command()
def deposit(
    node: Annotated[str, typer.Option("--node", envvar="PS_NODE", help="The model node's operator address.")],
    eth: Annotated[str, typer.Option("--eth", envvar="PS_ETH", help="ETH to deposit (e.g. 0.05).")],
    fresh_address: Annotated[
        bool,
        typer.Option(
            "--fresh-address/--main-address",
            envvar="PS_FRESH_ADDRESS",
            help="Open a new channel from a fresh address derived from your key, funded from it (docs/payments.md).",
        ),
    ] = False,
    state_dir: ClientStateDir = None,
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    deployment: DeploymentOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Put ETH on your channel to a model node: top up the open one, or open one (PS_PRIVATE_KEY pays)."""
    from ledger import InvalidChainInput, Role, checksum, parse_eth

    amount = parse_eth(eth, param="eth")
    if amount <= 0:
        raise InvalidChainInput("eth", eth, "must be more than 0")
    address = checksum(node, param="node")
    _dep, registry = open_chain(rpc_url, deployment, None)
    registered = registry.get_node(address)
    if registered is None or registered.role != Role.MODEL:
        raise InvalidChainInput("node", address, "is not a registered model node")
    wallet = env_wallet(rpc_url, deployment, state_dir)
    try:
        before = wallet.channel(address)
        channel = wallet.deposit(address, amount, fresh=fresh_address)
        action = "topped up" if before is not None and before.channel_id == channel.channel_id else "opened"
        result = {
            "action": action,
            **_row(channel, chain_now(registry), as_json=as_json, payer=_payer(wallet, channel)),
        }
        if as_json:
            result["deposited_wei"] = str(amount)
        else:
            result["deposited"] = _amount(amount)
        emit(result, as_json=as_json, title=None if as_json else f"channel {action}")
    finally:
        wallet.close()


@app.command()
def channels(
    include_closed: Annotated[
        bool, typer.Option("--all/--open", envvar="PS_ALL", help="Also list settled channels.")
    ] = False,
    state_dir: ClientStateDir = None,
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    deployment: DeploymentOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Your payment channels, reconciled with the chain: deposit, spent, signed, redeemed, left, state, deadline."""
    _dep, registry = open_chain(rpc_url, deployment, None)
    wallet = env_wallet(rpc_url, deployment, state_dir)
    try:
        now = chain_now(registry)
        rows = [
            _row(c, now, as_json=as_json, payer=_payer(wallet, c))
            for c in wallet.channels(include_closed=include_closed)
        ]
        if as_json:
            emit({"client": wallet.address, "channels": rows}, as_json=True)
        elif rows:
            emit(rows, as_json=False, title=f"channels of {wallet.address}")
        else:
            info(
                f"no channels for {wallet.address} (they open on the first paid request, or with `deposit`;"
                " after losing the state directory, `ps-client recover` finds them on chain)"
            )
    finally:
        wallet.close()


@app.command()
def close(
    node: Annotated[
        str | None, typer.Option("--node", envvar="PS_NODE", help="Close the channel(s) to this node.")
    ] = None,
    every: Annotated[bool, typer.Option("--all", envvar="PS_CLOSE_ALL", help="Close every open channel.")] = False,
    state_dir: ClientStateDir = None,
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    deployment: DeploymentOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start closing: the node may still redeem until the deadline; then `ps-client reclaim` returns the rest."""
    if (node is None) == (not every):
        raise typer.BadParameter("pass either --node ADDR or --all")
    _dep, registry = open_chain(rpc_url, deployment, None)
    wallet = env_wallet(rpc_url, deployment, state_dir)
    try:
        closed = wallet.start_close(node=node)
        now = chain_now(registry)
        rows = [{**_row(c, now, as_json=as_json, payer=_payer(wallet, c)), "tx_hash": r.tx_hash} for c, r in closed]
        if as_json:
            emit({"closing": rows}, as_json=True)
        elif rows:
            emit(rows, as_json=False, title="closing (reclaim with `ps-client reclaim` after the deadline)")
        else:
            info("no open channel to close")
    finally:
        wallet.close()


@app.command()
def reclaim(
    state_dir: ClientStateDir = None,
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    deployment: DeploymentOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Finish every close past its deadline and withdraw what the node did not redeem."""
    from cli._durations import describe_time

    _dep, registry = open_chain(rpc_url, deployment, None)
    wallet = env_wallet(rpc_url, deployment, state_dir)
    try:
        now = chain_now(registry)
        done = wallet.reclaim(now)
        waiting = [c for c in wallet.channels() if c.state == "closing" and c.closes_at > now]
        result: dict[str, Any] = {
            "settled": list(done.settled),
            "tx_hashes": [r.tx_hash for r in done.receipts],
            "still_closing": {str(c.channel_id): describe_time(c.closes_at, now) for c in waiting},
        }
        if as_json:
            result["withdrawn_wei"] = str(done.withdrawn_wei)
        else:
            result["withdrawn"] = _amount(done.withdrawn_wei)
            result["still_closing"] = ", ".join(f"{k} {v}" for k, v in result["still_closing"].items()) or "-"
            result["settled"] = ", ".join(str(s) for s in done.settled) or "-"
            result["tx_hashes"] = ", ".join(result["tx_hashes"]) or "-"
        emit(result, as_json=as_json, title=None if as_json else "reclaimed")
    finally:
        wallet.close()
