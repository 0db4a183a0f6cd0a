"""``ps-verifier evidence``, ``ps-verifier status`` and ``ps-node status`` as users run them: separate processes
against a real anvil with the contracts deployed, where two verifiers attested two model nodes with evidence
records in their stores, and one node failed (slashed and jailed)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cli.exit_codes import ExitCode
from ledger import dev_account
from tests._cli import InProcess
from tests._procs import run_cli
from tests.fixtures.attest import (
    ETH,
    NEUTRAL,
    address,
    attestations,
    ceil_fraction,
    expected_reputation,
    fresh_epoch,
    register_network,
)
from tests.fixtures.chain import ChainEnv
from verifier._epoch import AuditPolicy, Web3Blocks, epoch_bounds, find_anchor_block, plan_epoch, sign_epoch_seed
from verifier._evidence import EvidenceStore, record_header
from verifier._prompts import salt_commitment

FAILING, PASSING = address(1), address(2)
LOW, HIGH = 100_000, 900_000


def _env(chain: ChainEnv, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PS_")}
    env.update(PS_RPC_URL=chain.rpc_url, PS_DEPLOYMENT=str(chain.deployment_path), **extra)
    return env


def _run(tool: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run_cli(tool, args, env, timeout=120)


def _ok_json(proc: subprocess.CompletedProcess[str]) -> Any:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _failed(proc: subprocess.CompletedProcess[str], code: ExitCode, needle: str) -> str:
    assert proc.returncode == int(code), (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and len(lines) == 1 and needle in lines[0], proc.stderr
    return lines[0]


def _record(chain: ChainEnv, verifier: int, node: str, epoch: int, score: int) -> dict[str, Any]:
    """An evidence record as the runner writes one, with a real seed bound to the epoch's anchor block."""
    att = attestations(chain)
    start, _ = epoch_bounds(att.epoch_start(), att.epoch_length(), epoch)
    anchor = find_anchor_block(Web3Blocks(chain.w3), start)
    assert anchor is not None
    seed = sign_epoch_seed(
        dev_account(verifier), chain_id=chain.w3.eth.chain_id, attestations=att.address, epoch=epoch, anchor=anchor
    )
    policy = AuditPolicy(mean_challenges=2.0)
    plan = plan_epoch(
        seed.seed,
        epoch=epoch,
        epoch_start=att.epoch_start(),
        epoch_length=att.epoch_length(),
        nodes=[node],
        policy=policy,
        not_before=anchor.timestamp,
    )
    record: dict[str, Any] = {
        "kind": "planetserve-audit",
        "version": 1,
        "verifier": dev_account(verifier).address,
        "node": node,
        "epoch": epoch,
        "score": score,
        "challenges": [
            {
                "send_at_ms": c.send_at_ms,
                "prompt": "03+04=07\n12+07=",
                "max_tokens": 4,
                "temperature": 0.0,
                "top_p": 1.0,
                "seed": 7,
                "answer": {"text": "19", "token_ids": [9, 12], "logprobs": [-0.1, -0.2], "finish_reason": "stop"},
                "score": {"score": score / 1e6},
            }
            for c in plan.for_node(node)
        ],
    }
    header = record_header(
        seed,
        policy=policy,
        epoch_start=att.epoch_start(),
        epoch_length=att.epoch_length(),
        salt_commitment=salt_commitment(bytes(32)),
    )
    return record | header


def test_evidence_and_status_commands_show_what_was_stored_attested_and_penalised(
    chain: ChainEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    inproc = InProcess(monkeypatch, capsys)  # the same main(), without a process start, for the plain forms
    register_network(chain)
    epoch = fresh_epoch(chain, attestations(chain))
    hashes: dict[tuple[int, str], str] = {}
    for verifier in (5, 6):
        store = EvidenceStore(tmp_path / f"v{verifier}" / "evidence")
        for node, score in ((FAILING, LOW), (PASSING, HIGH)):
            digest = store.put(_record(chain, verifier, node, epoch, score))
            attestations(chain, verifier).attest(node, epoch, score, digest)
            hashes[(verifier, node)] = "0x" + digest.hex()
    # A record whose attestation never happened (say the transaction failed): status lists it apart.
    never = "0x" + EvidenceStore(tmp_path / "v5" / "evidence").put(_record(chain, 5, address(3), epoch, HIGH)).hex()
    v5 = _env(chain, PS_STATE_DIR=str(tmp_path / "v5"), PS_PRIVATE_KEY=dev_account(5).key.hex())
    v6 = _env(chain, PS_STATE_DIR=str(tmp_path / "v6"))

    # ps-verifier evidence: the record, re-hashed, with its seed signature and schedule checked.
    shown = _ok_json(_run("verifier", ["evidence", hashes[(5, FAILING)], "--json"], v5))
    assert shown["hash_verified"] is True and shown["signature_valid"] is True and shown["schedule_matches"] is True
    assert shown["record"] == EvidenceStore(tmp_path / "v5" / "evidence").get(hashes[(5, FAILING)])
    assert shown["record"]["score"] == LOW and shown["record"]["node"] == FAILING and shown["problems"] == []
    anchored = _ok_json(inproc("verifier", ["evidence", hashes[(6, PASSING)], "--check-anchor", "--json"], v6))
    assert anchored["anchor_valid"] is True and anchored["problems"] == []
    plain = inproc("verifier", ["evidence", hashes[(5, PASSING)].upper().replace("0X", "0x")], v5)
    assert plain.returncode == 0 and "hash_verified     True" in plain.stdout and "answer tokens" in plain.stdout
    assert dev_account(5).key.hex().removeprefix("0x") not in plain.stdout + plain.stderr + json.dumps(shown)

    # ps-verifier status: registration, the epoch, each attestation with its verdict, and the unattested record.
    status = _ok_json(_run("verifier", ["status", "--json"], v5))
    assert status["registered"] is True and status["role"] == "verifier" and status["active"] is True
    assert status["stake_wei"] == str(2 * ETH) and status["current_epoch"] == epoch and status["quorum"] == 2
    # Newest epoch first, then by node address.
    expected = sorted(
        [
            (epoch, FAILING, LOW, hashes[(5, FAILING)], True, True, LOW),
            (epoch, PASSING, HIGH, hashes[(5, PASSING)], True, False, HIGH),
        ],
        key=lambda row: str(row[1]).lower(),
    )
    fields = ("epoch", "node", "score", "evidence_hash", "in_store", "failed", "median")
    assert [tuple(a[f] for f in fields) for a in status["attestations"]] == expected
    assert all(a["finalized"] for a in status["attestations"])
    assert status["unattested"] == [{"epoch": epoch, "node": address(3), "evidence_hash": never}]
    assert status["total_attestations"] == 2 and status["total_records"] == 3
    assert inproc("verifier", ["status"], v5).returncode == 0

    # ps-node status of the failing node: jailed, reputation down, streak 1, penalised once, both attestations.
    node = _ok_json(_run("node", ["status", "--operator", FAILING, "--json"], _env(chain, PS_STATE_DIR=str(tmp_path))))
    assert node["registered"] is True and node["jailed"] is True and node["active"] is False
    assert node["reputation"] == expected_reputation(NEUTRAL, LOW, 1) and node["failure_streak"] == 1
    assert node["penalties"] == 1 and node["epochs_rated"] == 1 and node["attestations_received"] == 2
    assert sorted((a["verifier"], a["score"], a["evidence_hash"]) for a in node["attestations"]) == sorted(
        (dev_account(v).address, LOW, hashes[(v, FAILING)]) for v in (5, 6)
    )
    assert node["verdicts"] == [{"epoch": epoch, "attestations": 2, "finalized": True, "median": LOW, "failed": True}]
    slashed = ceil_fraction(3 * ETH, 100_000)
    assert node["slashes"] == [
        {
            "stake_slashed_wei": str(slashed),
            "stake_slashed_eth": "0.3",
            "stake_after_wei": str(3 * ETH - slashed),
        }
    ]
    assert node["stake_wei"] == str(3 * ETH - slashed)
    plain = inproc("node", ["status", "--operator", FAILING], _env(chain, PS_STATE_DIR=str(tmp_path)))
    assert plain.returncode == 0 and "jailed" in plain.stdout and "verdicts" in plain.stdout, plain.stderr


def test_evidence_errors_are_one_line_with_their_exit_codes(
    chain: ChainEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    inproc = InProcess(monkeypatch, capsys)
    register_network(chain)
    epoch = fresh_epoch(chain, attestations(chain))
    store = EvidenceStore(tmp_path / "evidence")
    digest = "0x" + store.put(_record(chain, 5, FAILING, epoch, LOW)).hex()
    env = _env(chain, PS_STATE_DIR=str(tmp_path))

    _failed(inproc("verifier", ["evidence", "0x" + "00" * 32], env), ExitCode.NOT_FOUND, "no evidence 0x0000")
    _failed(inproc("verifier", ["evidence", "0x1234"], env), ExitCode.INVALID_INPUT, "64 hex digits")
    _failed(inproc("verifier", ["evidence"], env), ExitCode.USAGE, "Missing argument")
    _failed(inproc("verifier", ["status"], env), ExitCode.KEY_ERROR, "PS_PRIVATE_KEY")  # or --verifier
    outsider = _ok_json(inproc("verifier", ["status", "--verifier", address(17), "--json"], env))
    assert outsider["registered"] is False and outsider["attestations"] == [] and outsider["total_records"] == 1
    nobody = _ok_json(inproc("node", ["status", "--operator", address(17), "--json"], env))
    assert nobody["registered"] is False and nobody["reputation"] == NEUTRAL and nobody["attestations"] == []
    path = store.find(digest)
    path.write_bytes(path.read_bytes().replace(b'"score":100000', b'"score":900000'))
    line = _failed(inproc("verifier", ["evidence", digest], env), ExitCode.TAMPERED, "no longer hashes to it")
    assert digest in line and str(path) in line
    as_json = _run("verifier", ["evidence", digest, "--json"], env)  # a separate process, as a script runs it
    assert as_json.returncode == ExitCode.TAMPERED and as_json.stdout == ""
    error = json.loads(as_json.stderr)["error"]
    assert error["type"] == "EvidenceTampered" and error["exit_name"] == "TAMPERED" and digest in error["message"]
