"""``ps-verifier evidence HASH`` and ``ps-verifier status``: what a verifier stored and attested.

``evidence`` reads the local evidence store (``<state dir>/evidence``, where ``ps-verifier run`` writes it) and
re-verifies the record before printing it: its bytes must hash to the name asked for (exit ``NOT_FOUND`` when there
is no such record, ``TAMPERED`` when the file no longer matches), then its epoch seed's signature and schedule are
checked and reported. No chain is needed for that. ``status`` reads the registry, the attestation contract, the
event index (synced first, the same SQLite file ``run`` uses) and the store.

web3 is imported inside the commands (``--help`` stays fast).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cli._main import new_app
from cli._node_chain import (
    DEFAULT_RPC_URL,
    DeploymentOpt,
    JsonOpt,
    Keystore,
    RegistryIndexDb,
    RpcUrl,
    StateDir,
    default_index_db,
    load_operator,
    open_chain,
    status_epochs,
)
from cli._output import emit, info

app = new_app("Inspect the verifier's evidence and attestations.")


def verifier_state_dir(value: Path | None) -> Path:
    """The verifier's state directory: ``--state-dir``/``PS_STATE_DIR``, else ``<user data dir>/verifier``."""
    from platformdirs import user_data_dir

    return value if value is not None else Path(user_data_dir("planetserve")) / "verifier"


def _store(state_dir: Path | None) -> Any:
    from verifier._evidence import EvidenceStore

    return EvidenceStore(verifier_state_dir(state_dir) / "evidence")


def _challenge_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per challenge for people: sizes and outcomes, not the prompt and answer texts (``--json`` has them)."""
    rows = []
    for index, challenge in enumerate(record.get("challenges") or []):
        if not isinstance(challenge, dict):
            continue
        answer = challenge.get("answer") if isinstance(challenge.get("answer"), dict) else None
        score = challenge.get("score") if isinstance(challenge.get("score"), dict) else None
        rows.append(
            {
                "#": index,
                "send at ms": challenge.get("send_at_ms", "-"),
                "prompt chars": len(str(challenge.get("prompt", ""))),
                "max tokens": challenge.get("max_tokens", "-"),
                "temperature": challenge.get("temperature", "-"),
                "answer tokens": "-" if answer is None else len(answer.get("token_ids") or []),
                "finish": "unanswered" if answer is None else answer.get("finish_reason", "-"),
                "score": "-" if score is None else score.get("score", "-"),
            }
        )
    return rows


@app.command()
def evidence(
    evidence_hash: Annotated[str, typer.Argument(help="0x + 64 hex digits: the evidence hash attested on chain.")],
    anchor: Annotated[
        bool,
        typer.Option(
            "--check-anchor", envvar="PS_CHECK_ANCHOR", help="Also check the seed's anchor block on the chain."
        ),
    ] = False,
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    state_dir: StateDir = None,
    as_json: JsonOpt = False,
) -> None:
    """Print a stored evidence record after re-hashing it, with its seed signature and schedule checked (and, with
    --check-anchor, its anchor block against the chain)."""
    from verifier._evidence import check_anchor, check_record, parse_hash

    digest = parse_hash(evidence_hash)
    store = _store(state_dir)
    record = store.get(digest)
    check = check_record(record)
    summary: dict[str, Any] = {
        "evidence_hash": "0x" + digest.hex(),
        "hash_verified": True,
        "signature_valid": check.signature_valid,
        "schedule_matches": check.schedule_matches,
        "problems": list(check.problems),
    }
    if anchor:
        from ledger import connect
        from verifier._epoch import Web3Blocks

        w3 = connect(rpc_url)
        valid, why = check_anchor(record, Web3Blocks(w3), chain_id=int(w3.eth.chain_id))
        summary["anchor_valid"] = valid
        if why:
            summary["problems"].append(why)
    if as_json:
        emit(summary | {"path": str(store.find(digest)), "record": record}, as_json=True)
        return
    shown = {key: record.get(key) for key in ("verifier", "node", "model", "epoch", "score") if key in record}
    emit(summary | shown | {"challenges": len(record.get("challenges") or [])}, as_json=False, title="evidence")
    rows = _challenge_rows(record)
    if rows:
        emit(rows, as_json=False, title="challenges")


@app.command()
def status(
    verifier: Annotated[
        str | None,
        typer.Option("--verifier", envvar="PS_VERIFIER_ADDRESS", help="Verifier address (default: the key's account)."),
    ] = None,
    epochs: Annotated[int, status_epochs("Latest epochs shown.")] = 10,
    db: RegistryIndexDb = None,
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    deployment: DeploymentOpt = None,
    keystore: Keystore = None,
    state_dir: StateDir = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the verifier's registration, stake, the current epoch, and its attestations per epoch and node."""
    from ledger import Attestations, Indexer
    from verifier._status import verifier_status

    address = verifier if verifier is not None else load_operator(keystore).address
    dep, registry = open_chain(rpc_url, deployment, None)
    folder = verifier_state_dir(state_dir)
    attestations = None if dep.attestations_address is None else Attestations(registry.w3, dep.attestations_address)
    with Indexer(registry, dep, db or default_index_db(folder, dep.chain_id)) as indexer:
        report = indexer.sync()
        info(f"indexed blocks {report.from_block}..{report.to_block}: {report.applied} new events")
        result = verifier_status(
            verifier=address,
            registry=registry,
            attestations=attestations,
            indexer=indexer,
            store=_store(state_dir),
            epochs=epochs,
        )
    data = result.to_json()
    if as_json:
        emit(data, as_json=True)
        return
    lines = {k: v for k, v in data.items() if k not in ("attestations", "unattested")}
    emit(lines, as_json=False, title="verifier status")
    if data["attestations"]:
        emit(data["attestations"], as_json=False, title=f"attestations (latest {epochs} epochs)")
    if data["unattested"]:
        emit(data["unattested"], as_json=False, title="evidence never attested")
