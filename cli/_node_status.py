"""``ps-node status``: a node's standing — registration and stake from the registry, reputation from the attestation
contract, and from the event index the attestations it received and the slashes it took.

Why the index for history: the contracts keep only current state (the reputation record, the tallies); what each
verifier attested in which epoch, and each slash, exist only as events, which the indexer folds into the same
SQLite file ``ps-node list`` uses (synced first). The verdict of each epoch shown is read from the contract's tally.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli._main import new_app
from cli._node_chain import (
    DEFAULT_RPC_URL,
    DeploymentOpt,
    IndexDb,
    JsonOpt,
    Keystore,
    RpcUrl,
    StateDir,
    _node_json,
    _unbonding,
    chain_now,
    default_index_db,
    load_operator,
    open_chain,
    state_dir_or_default,
    status_epochs,
)
from cli._output import emit, info

if TYPE_CHECKING:
    from ledger import Attestations, Indexer, NodeRegistry

app = new_app("Show a node's standing on chain.")


def node_status(
    *,
    address: str,
    registry: NodeRegistry,
    attestations: Attestations | None,
    indexer: Indexer | None,
    epochs: int,
) -> dict[str, Any]:
    """The node's status as ``ps-node status --json`` prints it (see the command's help for the fields)."""
    from ledger import format_eth

    node = registry.get_node(address)
    result: dict[str, Any] = {"operator": address, "registered": node is not None}
    if node is not None:
        result.update(_node_json(node))
        result["unbonding"] = _unbonding(node.unbonding_ends_at, chain_now(registry))
    result["pending_withdrawal_wei"] = str(registry.pending_withdrawal(address))
    if attestations is None:
        result.update(reputation=None, failure_streak=None, epochs_rated=None, penalties=None)
    else:
        record = attestations.record_of(address)
        result.update(
            reputation=record.reputation,
            failure_streak=record.failure_streak,
            epochs_rated=record.epochs_rated,
            penalties=record.penalties,
            current_epoch=attestations.current_epoch(),
        )
    received: list[dict[str, Any]] = []
    verdicts: list[dict[str, Any]] = []
    slashes: list[dict[str, Any]] = []
    if indexer is not None:
        rows = indexer.attestations(address)
        shown = sorted({epoch for epoch, _, _, _ in rows}, reverse=True)[:epochs]
        threshold = attestations.score_threshold() if attestations is not None else None
        for epoch in shown:
            if attestations is not None:
                tally = attestations.tally(address, epoch)
                verdicts.append(
                    {
                        "epoch": epoch,
                        "attestations": tally.count,
                        "finalized": tally.finalized,
                        "median": tally.median if tally.finalized else None,
                        "failed": (tally.median < threshold) if tally.finalized and threshold is not None else None,
                    }
                )
        received = [
            {"epoch": epoch, "verifier": verifier, "score": score, "evidence_hash": "0x" + evidence}
            for epoch, verifier, score, evidence in rows
            if epoch in shown
        ]
        slashes = [
            {"stake_slashed_wei": str(-delta), "stake_slashed_eth": format_eth(-delta), "stake_after_wei": str(after)}
            for kind, delta, after in indexer.stake_changes(address)
            if kind == "slash"
        ]
        result["attestations_received"] = len(rows)
    result.update(verdicts=verdicts, attestations=received, slashes=slashes)
    return result


@app.command()
def status(
    operator: Annotated[
        str | None,
        typer.Option("--operator", envvar="PS_OPERATOR", help="Operator address (default: the key's account)."),
    ] = None,
    epochs: Annotated[int, status_epochs("Latest rated epochs shown.")] = 10,
    db: IndexDb = None,
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    deployment: DeploymentOpt = None,
    keystore: Keystore = None,
    state_dir: StateDir = None,
    as_json: JsonOpt = False,
) -> None:
    """Show this node's role, stake, jail, unbonding, reputation and failure streak, the attestations it received
    per epoch with each epoch's verdict, and the slashes it took."""
    from ledger import Attestations, Indexer

    address = operator if operator is not None else load_operator(keystore).address
    dep, registry = open_chain(rpc_url, deployment, None)
    attestations = None if dep.attestations_address is None else Attestations(registry.w3, dep.attestations_address)
    folder: Path = state_dir_or_default(state_dir)
    with Indexer(registry, dep, db or default_index_db(folder, dep.chain_id)) as indexer:
        report = indexer.sync()
        info(f"indexed blocks {report.from_block}..{report.to_block}: {report.applied} new events")
        result = node_status(
            address=address, registry=registry, attestations=attestations, indexer=indexer, epochs=epochs
        )
    if as_json:
        emit(result, as_json=True)
        return
    tables = {key: result.pop(key) for key in ("verdicts", "attestations", "slashes")}
    emit(result, as_json=False, title="node status")
    for key, rows in tables.items():
        if rows:
            emit(rows, as_json=False, title=key)
