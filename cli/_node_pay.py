"""``ps-node earnings|claim``: what the node earned from paid requests, and redeeming it (protocol §10.4).

Why a separate module: these read the node's durable voucher book (the SQLite file a paying model node writes before
each answer) as well as the chain, and only they do. ``claim`` redeems every voucher that would pay something, in
batches of the contract's ``MAX_BATCH``, and records each batch as redeemed after its receipt, so a claim cut short
is safely run again. web3 is imported inside the commands (``--help`` stays fast).
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
    RpcUrl,
    StateDir,
    load_operator,
    open_chain,
    state_dir_or_default,
)
from cli._output import emit, info

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

    from ledger import ChannelBook, PaymentChannels, VoucherStore
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


def open_voucher_store(
    rpc_url: str,
    deployment: Path | None,
    state_dir: Path | None,
    vouchers_db: str | None,
    operator: str,
    *,
    signer: LocalAccount | None = None,
) -> tuple[VoucherStore, PaymentChannels, str]:
    """The node's voucher book, a ``PaymentChannels`` handle (signed by ``signer`` when given) and the book's URL."""
    from ledger import PaymentChannels, VoucherStore

    dep, registry = open_chain(rpc_url, deployment, None)
    pay = PaymentChannels(registry.w3, dep.payments_address, signer)
    url = vouchers_db or default_vouchers_db(state_dir_or_default(state_dir), dep.chain_id)
    return VoucherStore(url, domain=pay.domain(), node=operator, channels=pay), pay, url


def payment_gate(
    rpc_url: str,
    deployment: Path | None,
    state_dir: Path | None,
    vouchers_db: str | None,
    operator: str,
    tokenize: Callable[[str], Sequence[int]],
) -> PaymentGate | None:
    """The gate a model node serves behind (``create_model_app(..., payments=...)``): its voucher book at the price
    it registered on chain; None when that price is 0 (free serving) or the node is not registered."""
    from node.overlay._payments import PaymentGate

    _, registry = open_chain(rpc_url, deployment, None)
    node = registry.get_node(operator)
    if node is None or node.price_per_1k_tokens == 0:
        return None
    store, _, _ = open_voucher_store(rpc_url, deployment, state_dir, vouchers_db, operator)
    return PaymentGate(store, price_per_1k_tokens=node.price_per_1k_tokens, tokenize=tokenize)


def _books(store: VoucherStore, url: str) -> list[ChannelBook]:
    """Every channel the node ever accepted a voucher on, read from the book's own table."""
    from sqlmodel import Session, col, create_engine, select

    from ledger._voucher_store import StoredVoucher

    domain = store.domain
    engine = create_engine(url)
    try:
        with Session(engine) as session:
            ids = session.exec(
                select(StoredVoucher.channel_id).where(
                    col(StoredVoucher.chain_id) == domain.chain_id, col(StoredVoucher.contract) == domain.contract
                )
            ).all()
    finally:
        engine.dispose()
    books = [store.book(int(i)) for i in sorted(int(i) for i in ids)]
    return [b for b in books if b is not None]


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

    address = operator if operator is not None else load_operator(keystore).address
    store, pay, url = open_voucher_store(rpc_url, deployment, state_dir, vouchers_db, address)
    books = _books(store, url)
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
    """Redeem every voucher that would pay something (one transaction per batch of up to 64 channels)."""
    account = load_operator(keystore)
    store, pay, _ = open_voucher_store(rpc_url, deployment, state_dir, vouchers_db, account.address, signer=account)
    claimed = 0
    channels = 0
    transactions: list[dict[str, Any]] = []
    # Bounded: each batch marks its vouchers redeemed, so the next read returns fewer; stop on no progress.
    while batch := store.redeemable():
        receipt = pay.redeem_batch(batch)
        before = sum(b.redeemed for b in (store.book(v.channel_id) for v in batch) if b is not None)
        store.mark_redeemed(batch)
        after = sum(b.redeemed for b in (store.book(v.channel_id) for v in batch) if b is not None)
        claimed += after - before
        channels += len(batch)
        transactions.append({"transaction": receipt.tx_hash, "gas_used": receipt.gas_used})
        info(f"redeemed {len(batch)} channel(s) in {receipt.tx_hash}")
        if after == before:
            break
    emit(
        {"claimed_wei": str(claimed), "channels": channels, "transactions": transactions},
        as_json=as_json,
        title="claimed" if channels else "nothing to claim",
    )
