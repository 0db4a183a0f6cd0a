"""``ps-node earnings|claim``: what the node earned from paid requests, and redeeming it (protocol §10.4).

Why a separate module: these read the node's durable voucher book (the SQLite file a paying model node writes before
each answer) as well as the chain, and only they do. ``claim`` redeems every voucher that would pay something, in
batches of the contract's ``MAX_BATCH``, through the same :class:`node.overlay._redeemer.Redeemer` that ``ps-node
serve`` runs on a schedule; each batch is recorded as redeemed after its receipt, so a claim cut short is safely run
again. web3 is imported inside the commands (``--help`` stays fast).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli._main import new_app
from cli._node_chain import (
    DEFAULT_RPC_URL,
    DeploymentOpt,
    JsonOpt,
    Keystore,
    NodeChain,
    RpcUrl,
    StateDir,
    open_node_chain,
    state_dir_or_default,
)
from cli._output import emit, info

if TYPE_CHECKING:
    from ledger import PaymentChannels, VoucherStore
    from node.overlay._payments import PaymentGate

app = new_app("Earnings from paid requests: show them, claim them.")

VouchersDb = Annotated[
    str | None,
    typer.Option(
        "--vouchers-db",
        envvar="PS_VOUCHERS_DB",
        help="SQLAlchemy URL of the node's voucher book (default: vouchers-<chainId>.sqlite in the state dir).",
    ),
]


def default_vouchers_db(folder: Path, chain_id: int) -> str:
    """The SQLite URL of the voucher book kept in ``folder`` (created 0700), one file per chain id."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return f"sqlite:///{folder / f'vouchers-{chain_id}.sqlite'}"


def node_voucher_store(
    chain: NodeChain, state_dir: Path | None, vouchers_db: str | None
) -> tuple[VoucherStore, PaymentChannels, str]:
    """The node's voucher book, a ``PaymentChannels`` handle (signed when ``chain`` signs) and the book's URL."""
    from ledger import VoucherStore

    pay = chain.payments()
    url = vouchers_db or default_vouchers_db(state_dir_or_default(state_dir), chain.deployment.chain_id)
    return VoucherStore(url, domain=pay.domain(), node=chain.operator, channels=pay), pay, url


def open_voucher_store(
    rpc_url: str,
    deployment: Path | None,
    state_dir: Path | None,
    vouchers_db: str | None,
    operator: str,
) -> tuple[VoucherStore, PaymentChannels, str]:
    """:func:`node_voucher_store` for ``operator``, read-only."""
    chain = open_node_chain(rpc_url, deployment, None, sign=False, operator=operator)
    return node_voucher_store(chain, state_dir, vouchers_db)


def payment_gate(
    rpc_url: str,
    deployment: Path | None,
    state_dir: Path | None,
    vouchers_db: str | None,
    operator: str,
    tokenize: Callable[[str], Sequence[int]],
) -> PaymentGate | None:
    """The gate a model node serves behind (``create_model_app(..., payments=...)``): its voucher book at the price
    it registered on chain; None when that price is 0 (free serving) or the node is not registered. The gate owns
    the book: ``gate.store.close()`` when done."""
    from node.overlay._payments import PaymentGate

    chain = open_node_chain(rpc_url, deployment, None, sign=False, operator=operator)
    node = chain.registry.get_node(chain.operator)
    if node is None or node.price_per_1k_tokens == 0:
        return None
    store, _, _ = node_voucher_store(chain, state_dir, vouchers_db)
    return PaymentGate(store, price_per_1k_tokens=node.price_per_1k_tokens, tokenize=tokenize)


@app.command()
def earnings(
    operator: Annotated[
        str | None,
        typer.Option("--operator", envvar="PS_OPERATOR", help="Operator address (default: the key's account)."),
    ] = None,
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    deployment: DeploymentOpt = None,
    keystore: Keystore = None,
    state_dir: StateDir = None,
    vouchers_db: VouchersDb = None,
    as_json: JsonOpt = False,
) -> None:
    """Show what paid requests earned: served (charged), held in vouchers, redeemed, locked and withdrawable."""
    from ledger import format_eth

    chain = open_node_chain(rpc_url, deployment, keystore, sign=False, operator=operator)
    address = chain.operator
    store, pay, _ = node_voucher_store(chain, state_dir, vouchers_db)
    with store:
        books = store.books()
    balances = pay.balances(address)
    amounts = {
        "served": sum(b.owed for b in books),
        "vouchers": sum(b.latest.cumulative_amount for b in books),
        "redeemed": sum(b.redeemed for b in books),
        "unredeemed": sum(b.unredeemed for b in books),
        "locked": balances.locked,
        "withdrawable": balances.withdrawable,
    }
    result: dict[str, Any] = {"operator": address, "channels": len(books)}
    for name, wei in amounts.items():
        result[f"{name}_wei"] = str(wei)
        if not as_json:
            result[f"{name}_wei"] = f"{wei} ({format_eth(wei)} ETH)"
    result["locked_until"] = balances.locked_until
    emit(result, as_json=as_json, title="earnings")


@app.command()
def claim(
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    deployment: DeploymentOpt = None,
    keystore: Keystore = None,
    state_dir: StateDir = None,
    vouchers_db: VouchersDb = None,
    as_json: JsonOpt = False,
) -> None:
    """Redeem every voucher that would pay something (one transaction per batch of up to 64 channels).

    The same code as the redeemer ``ps-node serve`` runs on a schedule: a voucher already redeemed on chain (by an
    earlier run cut short) updates the book instead of being sent again.
    """
    from node.overlay._redeemer import Redeemer

    chain = open_node_chain(rpc_url, deployment, keystore)
    store, pay, _ = node_voucher_store(chain, state_dir, vouchers_db)
    with store:
        report = Redeemer(store, pay).claim()
    for receipt in report.transactions:
        info(f"redeemed in {receipt.tx_hash} ({receipt.gas_used} gas)")
    emit(
        {
            "claimed_wei": str(report.redeemed_wei),
            "channels": report.channels,
            "transactions": [{"transaction": r.tx_hash, "gas_used": r.gas_used} for r in report.transactions],
        },
        as_json=as_json,
        title="claimed" if report.channels else "nothing to claim",
    )
