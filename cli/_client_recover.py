"""``ps-client recover``: rebuild the wallet's book from the chain after the client state directory was lost.

Why a command of its own (not automatic when the book is empty): an empty book is also a client that never paid,
or one pointed at a new ``--state-dir`` on purpose; recovery reads every ``ChannelOpened`` event since the
deployment and starts closing what it finds, which the user should ask for. What it finds is closed, never paid on
again: the amount last signed on it is not known (docs/payments.md, "Recovering a lost state directory").

Keys only from ``PS_PRIVATE_KEY``. Amounts print in ETH and exact wei.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from cli._client_wallet import ClientStateDir, _row, env_wallet
from cli._main import new_app
from cli._node_chain import DEFAULT_RPC_URL, DeploymentOpt, JsonOpt, RpcUrl, chain_now, open_chain
from cli._output import emit, info

app = new_app("Rebuild the wallet's book from the chain.")


@app.command()
def recover(
    gap_limit: Annotated[
        int,
        typer.Option(
            "--gap-limit",
            envvar="PS_GAP_LIMIT",
            min=1,
            max=1000,
            help="Stop after this many fresh-address indices in a row without a channel.",
        ),
    ] = 20,
    from_block: Annotated[
        int | None,
        typer.Option(
            "--from-block", envvar="PS_FROM_BLOCK", min=0, help="First block to read (default: the deployment's)."
        ),
    ] = None,
    close: Annotated[
        bool,
        typer.Option("--close/--no-close", envvar="PS_RECOVER_CLOSE", help="Start closing what is found (default)."),
    ] = True,
    state_dir: ClientStateDir = None,
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    deployment: DeploymentOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Find your channels on chain (main and fresh addresses), add them to the book and start closing them."""
    dep, registry = open_chain(rpc_url, deployment, None)
    wallet = env_wallet(rpc_url, deployment, state_dir)
    try:
        done = wallet.recover(
            from_block=dep.deploy_block if from_block is None else from_block, gap_limit=gap_limit, close=close
        )
        now = chain_now(registry)
        closing = {state.channel_id: receipt.tx_hash for state, receipt in done.closing}
        rows: list[dict[str, Any]] = []
        for found in done.found:
            state = next((c for c in wallet.channels(include_closed=True) if c.channel_id == found.channel_id), found)
            row = _row(state, now, as_json=as_json, payer=wallet.signer_address(state))
            row["close_tx_hash" if as_json else "close tx"] = closing.get(
                state.channel_id, "-" if not as_json else None
            )
            rows.append(row)
        summary = {
            "client": wallet.address,
            "from_block": done.from_block,
            "to_block": done.to_block,
            "fresh_indices_scanned": done.fresh_indices,
            "already_in_book": done.known,
            "closing_started": len(done.closing),
        }
        if as_json:
            emit({**summary, "recovered": rows}, as_json=True)
            return
        emit(summary, as_json=False, title="recovery")
        if rows:
            emit(rows, as_json=False, title="recovered channels (reclaim with `ps-client reclaim` after the deadline)")
        else:
            info("no channel of yours on chain that the book did not know")
    finally:
        wallet.close()
