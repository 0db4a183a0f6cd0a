"""Every cheating strategy is caught on anvil: one network, one model node per strategy, one honest node.

The strategies (beside ``CheatConfig(mode="canned")``, which ``test_verifier_runner`` covers): each variant kind of
``make_variant`` served as a whole node under the registered model's id (fewer layers, half width, int8 kernels,
under-trained, another seed), a node that replays earlier answers to other prompts, and a node that substitutes the
under-trained variant on a seeded half of its requests. A committee of one verifier (quorum 1) audits them through the
private, paid network for four short epochs with ``tests/_committee.py``'s CUSUM (it alarms after about two
clearly failed challenges).

Each cheater ends penalized (at least once), slashed, jailed, and with a lower reputation than it had before its
first penalty and than the honest node's. A node caught in the first epoch ends below neutral. One caught later (the
int8 node, whose answers score 0.5 each, always; the fractional cheater or another variant when an epoch's first
challenges happened to pass) passed an epoch or two first: its CUSUM was still under the threshold, so the attested
score was a pass and its reputation rose above neutral, and one penalty (weight 0.2 for a first failure) pulls it
down but not always under neutral (0.48-0.61 seen, neutral 0.5). The 20%
substitution the issue names needs more challenges than a test can afford: its detection rate and epochs to
detection are measured in ``bench/verification.py``.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from node.inference import EngineConfig, TorchEngine
from node.inference._training import VARIANT_KINDS
from node.inference.testing import CheatConfig
from tests._committee import CUSUM, EPOCH_S, NEUTRAL, verifier_committee
from tests.fixtures.auditnet import MODEL_STAKE, AuditNet, audit_net
from tests.fixtures.variants import ensure_variant
from verifier._runner import EpochReport

#: The seeded half of requests the fractional cheater substitutes (``CheatConfig.seed``).
FRACTION, FRACTION_SEED = 0.5, 0
#: The variant the fractional cheater substitutes: its answers fail every challenge (scores 0.00-0.07 measured), so
#: whether the node is caught rests on the share cheated on. With fewer-layers, whose greedy tokens often equal the
#: base's (a challenge then scores 0.5, +0.2 on the CUSUM), seed 0's draws (2 honest, 2 cheated, 1 honest, ...) can
#: stay under the threshold for eight challenges; it was caught in epoch 2 or 3 in the runs measured.
FRACTION_VARIANT = "undertrained"
#: Epochs audited: a whole-node int8 answer scores 0.5 (same tokens, log-probs off), +0.2 on the CUSUM, so it alarms
#: at its fifth challenge; four epochs of at least two challenges leave room for an audit lost to a loaded machine.
EPOCHS = 4


@pytest.fixture(scope="session")
def variant_dirs(tiny_model_dir: Path) -> dict[str, Path]:
    """Every variant kind of the tests' tiny model, cached under ``build/test-models`` (``ensure_variant``)."""
    return {kind: ensure_variant(tiny_model_dir, kind) for kind in VARIANT_KINDS}


def _scores(net: AuditNet, node: str) -> list[float]:
    """The per-challenge scores in the verifier's evidence records for ``node`` (for failure messages)."""
    store = net.root / "verifier-0" / "evidence"
    records = [json.loads(p.read_text()) for p in store.rglob(f"{node}.*.json")]
    return [round(float(c["score"]["score"]), 3) for r in records for c in r["challenges"] if c.get("score")]


async def test_a_node_serving_each_cheating_variant_is_slashed_and_jailed_and_the_honest_node_is_not(
    tiny_model_dir: Path, variant_dirs: dict[str, Path], tmp_path: Path
) -> None:
    strategies: list[tuple[str, CheatConfig | None, Path | None]] = [("honest", None, None)]
    strategies += [(kind, None, path) for kind, path in variant_dirs.items()]
    strategies.append(("replay", CheatConfig(mode="replay"), None))
    fractional = CheatConfig(mode="substitute", fraction=FRACTION, seed=FRACTION_SEED)
    strategies.append((f"substitute {FRACTION:.0%}", fractional, variant_dirs[FRACTION_VARIANT]))
    cheats = [cheat for _, cheat, _ in strategies]
    variants = [variant for _, _, variant in strategies]
    async with audit_net(
        tiny_model_dir, tmp_path, cheats=cheats, variants=variants, verifiers=1, relays=4, epoch_length=EPOCH_S
    ) as net:
        names = {side.account.address: name for side, (name, _, _) in zip(net.models, strategies, strict=True)}
        reader, registry = net.attestations(), net.registry()
        reports: list[EpochReport] = []
        #: Each node's reputation after each epoch concluded (its attestation included), in epoch order.
        reputations: list[dict[str, int]] = []

        def concluded(report: EpochReport) -> None:
            reports.append(report)
            reputations.append({node: reader.reputation_of(node) for node in names})

        reference = TorchEngine.from_folder(tiny_model_dir, EngineConfig(device="cpu", max_running=8))
        try:
            async with verifier_committee(net, reference, tmp_path) as committee:
                (verifier,) = committee
                async with asyncio.timeout(20 * EPOCH_S):
                    await verifier.run(EPOCHS, on_epoch=concluded)
        finally:
            await reference.close()

        seen: dict[str, Any] = {}
        for node, name in names.items():
            record = reader.record_of(node)
            history = [NEUTRAL] + [after[node] for after in reputations]
            penalized = [
                i for i, r in enumerate(reports) if any(v.node == node and v.outcome == "penalized" for v in r.verdicts)
            ]
            seen[name] = {
                "penalties": record.penalties,
                "reputation": record.reputation,
                "caught_in_epoch": penalized[0] + 1 if penalized else None,
                "before_penalty": history[penalized[0]] if penalized else None,
                "history": history,
                "jailed": registry.is_jailed(node),
                "stake": registry.stake_of(node),
                "outcomes": [v.outcome for r in reports for v in r.verdicts if v.node == node],
                "scores": _scores(net, node),
            }
        detail = json.dumps(seen, indent=1)
        honest = seen.pop("honest")
        assert honest["penalties"] == 0 and honest["reputation"] >= NEUTRAL, detail
        assert not honest["jailed"] and honest["stake"] == MODEL_STAKE, detail
        assert honest["scores"] and min(honest["scores"]) > 1 - CUSUM.kappa, detail
        missed = [
            name
            for name, got in seen.items()
            if not (
                got["penalties"] >= 1
                and got["jailed"]
                and got["stake"] < MODEL_STAKE
                and got["reputation"] < min(got["before_penalty"], honest["reputation"])
            )
        ]
        assert not missed, f"not caught: {missed}\n{detail}"
        assert all(got["reputation"] < NEUTRAL for got in seen.values() if got["caught_in_epoch"] == 1), detail
        # The fractional cheater cheated on some of its requests, not all.
        engine = net.models[-1].engine
        assert 0 < engine.cheated_requests < engine.served_requests, detail
