"""The verifier's runner against anvil with real small models: a committee of three audits two model nodes over
short epochs through the private, paid network, and attests; the canned cheater is slashed and jailed and stops
getting traffic, the honest node (greedy and sampled audits alike) keeps its reputation.

Also ``ps-verifier run`` as a separate process: it audits an epoch and attests, and its state survives a restart
without counting an epoch twice; it refuses a key that is not an active verifier with one line.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from asyncio.subprocess import PIPE
from pathlib import Path

import pytest

from cli.exit_codes import ExitCode
from ledger import Role
from node.client import Client, ClientConfig
from node.client._wallet import Wallet
from node.inference import EngineConfig, TorchEngine
from node.overlay import CompletionRequest, Route
from tests._cli import InProcess, assert_failed, cli_env
from tests._committee import CUSUM, EPOCH_S, NEUTRAL, verifier_committee
from tests.fixtures.attest import register
from tests.fixtures.auditnet import MODEL_STAKE, AuditNet, audit_net
from tests.fixtures.chain import ChainEnv
from verifier._runner import EpochReport, Verifier, VerifierConfig


async def _user_destinations(net: AuditNet, tmp: Path, requests: int) -> list[str]:
    """Where a user's ``Client`` (reading the registry through its own index, paying its own way) sends requests."""
    indexer = net.indexer("user")
    _, directory = net.sources(indexer)
    routes: list[Route] = []
    wallet = Wallet(net.payments(), net.user, budget_wei=10**17, deposit_wei=10**16, state_dir=tmp / "user-wallet")
    try:
        async with Client(
            directory, ClientConfig(models=(net.model,), policy="round_robin"), on_route=routes.append, wallet=wallet
        ) as client:
            for i in range(requests):
                request = CompletionRequest(model=net.model_id, prompt=f"{i:02d}+01=", max_tokens=2, seed=i)
                await client.complete(request)
    finally:
        wallet.close()
        indexer.close()
    return [r.destination.operator for r in routes]


async def test_a_committee_slashes_and_jails_a_canned_cheater_and_keeps_the_honest_node(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    async with audit_net(tiny_model_dir, tmp_path, epoch_length=EPOCH_S) as net:
        honest, cheater = net.honest().account.address, net.cheater().account.address
        reader = net.attestations()
        assert reader.reputation_of(honest) == NEUTRAL
        # Before any verdict a user's traffic reaches both nodes.
        assert set(await _user_destinations(net, tmp_path / "before", 4)) == {honest, cheater}
        reference = TorchEngine.from_folder(tiny_model_dir, EngineConfig(device="cpu", max_running=8))
        reports: list[list[EpochReport]] = [[] for _ in net.verifiers]
        try:
            async with verifier_committee(net, reference, tmp_path) as committee:
                await asyncio.gather(*(v.run(3, on_epoch=reports[i].append) for i, v in enumerate(committee)))
        finally:
            await reference.close()

        # The cheater: caught, slashed (stake), penalized on chain and jailed.
        record = reader.record_of(cheater)
        assert record.penalties >= 1 and record.reputation < NEUTRAL
        registry = net.registry()
        assert registry.is_jailed(cheater) and registry.stake_of(cheater) < MODEL_STAKE
        verdicts = [v for per in reports for r in per for v in r.verdicts if v.node == cheater]
        assert any(v.alarm and v.score is not None and v.score < NEUTRAL for v in verdicts)
        assert any(v.outcome == "penalized" for v in verdicts)
        # Once jailed it was skipped, not audited (and not paid).
        last = [per[-1] for per in reports]
        assert all(cheater in r.skipped and all(v.node != cheater for v in r.verdicts) for r in last)

        # The honest node: every attested score passed, its reputation rose, it is active.
        assert not registry.is_jailed(honest) and registry.stake_of(honest) == MODEL_STAKE
        assert reader.reputation_of(honest) >= NEUTRAL and reader.record_of(honest).penalties == 0
        mine = [v for per in reports for r in per for v in r.verdicts if v.node == honest]
        assert mine and all(not v.alarm and (v.score is None or v.score >= NEUTRAL) for v in mine)
        assert any(v.outcome in ("attested", "finalized") for v in mine)
        # Sampled audits (temperature 0.8) of the honest node were among them, and scored as honest.
        store = net.root / "verifier-0" / "evidence"
        records = [json.loads(p.read_text()) for p in store.rglob(f"{honest}.*.json")]
        sampled = [c for r in records for c in r["challenges"] if c["temperature"] > 0 and c["answer"]]
        assert sampled and all(c["score"]["score"] > 1 - CUSUM.kappa for c in sampled)

        # A user's client no longer routes to the jailed node.
        after = await _user_destinations(net, tmp_path / "after", 4)
        assert after and set(after) == {honest}


@pytest.mark.parametrize("who", ["unregistered", "model node"])
def test_ps_verifier_run_refuses_a_key_that_is_not_an_active_verifier(
    chain: ChainEnv,
    tmp_path: Path,
    tiny_model_dir: Path,
    who: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:

    index = 12
    if who == "model node":
        register(chain, index, Role.MODEL, 2 * 10**18)
    run = InProcess(monkeypatch, capsys)
    proc = run("verifier", ["run", "--model", str(tiny_model_dir), "--epochs", "1"], cli_env(chain, tmp_path, index))
    line = assert_failed(proc, ExitCode.KEY_ERROR, chain.account(index).address)
    assert ("not registered" in line) if who == "unregistered" else ("registered as a model" in line)


async def test_ps_verifier_run_audits_an_epoch_and_attests_and_its_state_survives_a_restart(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    async with audit_net(tiny_model_dir, tmp_path, cheats=(None,), verifiers=1, relays=4, epoch_length=EPOCH_S) as net:
        honest = net.honest().account.address
        env = {k: v for k, v in os.environ.items() if not k.startswith("PS_")}
        env |= {
            "PS_RPC_URL": net.anvil.rpc_url,
            "PS_DEPLOYMENT": str(net.root / "deployment.json"),
            "PS_PRIVATE_KEY": net.verifiers[0].key.hex(),
            "PS_PAYER_KEY": net.payers[0].key.hex(),
        }
        code = "import sys; from cli.verifier import main; sys.argv[0] = 'ps-verifier'; main()"
        args = ["run", "--model", str(tiny_model_dir), "--epochs", "1", "--mean-challenges", "3"]
        args += ["--max-prompt-chars", "400", "--state-dir", str(tmp_path / "cli-verifier"), "--json"]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, *args, env=env, stdout=PIPE, stderr=PIPE
        )
        async with asyncio.timeout(120):
            out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()[-3000:]
        (line,) = out.decode().splitlines()  # one JSON object per epoch
        report = json.loads(line)
        (verdict,) = report["verdicts"]
        assert verdict["node"] == honest and verdict["answered"] >= 1
        assert verdict["outcome"] == "finalized" and verdict["score"] >= NEUTRAL  # committee of one: quorum 1
        assert net.attestations().tally(honest, report["epoch"]).finalized
        # Structured log lines on stderr, no prompt text (the evidence store has it).
        assert "verifier audit" in err.decode() and "verifier attest" in err.decode()
        evidence = next((tmp_path / "cli-verifier" / "evidence").rglob("*.json"))
        prompts = [c["prompt"] for c in json.loads(evidence.read_text())["challenges"]]
        assert prompts and not any(p in err.decode() for p in prompts if len(p) > 8)

        # A verifier started again on the process's state dir restores its CUSUM state and, auditing the same epoch
        # again (a restart inside it), neither feeds the scores twice nor attests twice.
        reference = TorchEngine.from_folder(tiny_model_dir, EngineConfig(device="cpu"))
        indexer = net.indexer("restart")
        nodes, directory = net.sources(indexer)
        wallet = Wallet(net.payments(), net.payers[0], budget_wei=10**17, deposit_wei=10**16, state_dir=tmp_path / "w2")
        try:
            async with Client(directory, ClientConfig(models=(net.model,)), wallet=wallet) as client:
                again = Verifier(
                    VerifierConfig(state_dir=tmp_path / "cli-verifier", model_dir=tiny_model_dir, max_prompt_chars=400),
                    account=net.verifiers[0],
                    attestations=net.attestations(net.verifiers[0]),
                    nodes=nodes,
                    client=client,
                    engine=reference,
                    model_id=net.model_id,
                )
                before = again.sequential.state(honest)
                assert before.challenges == verdict["answered"]
                rerun = await again.run_epoch(report["epoch"])
                assert again.sequential.state(honest) == before
                assert {v.outcome for v in rerun.verdicts} <= {"epoch_finalized", "too_late", "abstained"}
        finally:
            wallet.close()
            indexer.close()
            await reference.close()
