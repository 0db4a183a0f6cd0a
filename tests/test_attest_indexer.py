"""The indexer folds the attestation contract's events in with the registry's, on SQLite and on a real PostgreSQL:
reputation, failure streak, penalties and attestations per node; a reorg undoes them; a deployment file without the
contract still indexes the registry. And every Attestations error has its Python class with the ABI's arguments."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from ledger import Indexer, Role, load_artifact
from ledger._reverts import REVERT_CLASSES
from tests.fixtures.attest import (
    MODELS,
    NEUTRAL,
    VERIFIERS,
    address,
    attestations,
    evidence,
    expected_reputation,
    fresh_epoch,
    register,
    register_network,
)
from tests.fixtures.chain import ChainEnv, rpc

MakeDb = Callable[..., str]
NODE = MODELS[0]


@pytest.fixture(params=["sqlite", "postgresql"])
def make_db(request: pytest.FixtureRequest, tmp_path: Path) -> MakeDb:
    """``make_db(name)``: the URL of a fresh, empty index database (SQLite file, or a database on the real server)."""
    if request.param == "sqlite":
        return lambda name="index": f"sqlite:///{tmp_path / f'{name}.sqlite'}"
    factory: MakeDb = request.getfixturevalue("postgres_db")
    return factory


def _fail_epoch(chain: ChainEnv, node: int) -> int:
    att = attestations(chain)
    epoch = fresh_epoch(chain, att)
    for verifier, score in zip(VERIFIERS[:2], (100_000, 300_000), strict=True):
        attestations(chain, verifier).attest(address(node), epoch, score, evidence(verifier, epoch))
    return epoch


def _view(indexer: Indexer) -> list[tuple[object, ...]]:
    return [
        (n.operator, n.reputation, n.failure_streak, n.penalties, n.jailed, n.active, n.stake)
        for n in indexer.nodes(include_deregistered=True)
    ]


def test_reputation_penalties_and_attestations_are_indexed_and_a_reorg_undoes_them(
    chain: ChainEnv, make_db: MakeDb
) -> None:
    register_network(chain)
    with Indexer(chain.registry(), chain.deployment, make_db(), confirmations=0) as indexer:
        indexer.sync()
        before = _view(indexer)
        fork = rpc(chain.w3, "evm_snapshot", [])
        epoch = _fail_epoch(chain, NODE)
        indexer.sync()
        node = {n.operator: n for n in indexer.nodes()}[address(NODE)]
        assert (
            node.reputation
            == expected_reputation(NEUTRAL, 200_000, 1)
            == attestations(chain).reputation_of(address(NODE))
        )
        assert (node.failure_streak, node.penalties, node.jailed, node.active) == (1, 1, True, False)
        assert [a[:3] for a in indexer.attestations(address(NODE))] == [
            (epoch, address(VERIFIERS[0]), 100_000),
            (epoch, address(VERIFIERS[1]), 300_000),
        ]
        assert rpc(chain.w3, "evm_revert", [fork]) is True
        register(chain, 12, Role.RELAY, 10**17)  # a shorter chain, other blocks
        report = indexer.sync()
        assert report.rolled_back > 0 and not report.reset
        after = [row for row in _view(indexer) if row[0] != address(12)]
        assert after == before  # reputation neutral again, no penalty, not jailed
        assert indexer.attestations(address(NODE)) == []
        with Indexer(chain.registry(), chain.deployment, make_db("fresh"), confirmations=0) as fresh:
            fresh.sync()
            assert _view(fresh) == _view(indexer)


def test_a_deployment_file_without_attestations_still_indexes_the_registry(chain: ChainEnv, tmp_path: Path) -> None:
    register_network(chain)
    _fail_epoch(chain, NODE)
    contracts = {k: v for k, v in chain.deployment.contracts.items() if k != "Attestations"}
    old = dataclasses.replace(chain.deployment, contracts=contracts)
    assert old.attestations_address is None
    with Indexer(chain.registry(), old, f"sqlite:///{tmp_path / 'old.sqlite'}") as indexer:
        indexer.sync()
        node = {n.operator: n for n in indexer.nodes()}[address(NODE)]
        assert node.jailed and not node.active  # the registry's own events
        assert (node.reputation, node.penalties) == (NEUTRAL, 0)  # the attestation contract was not read


def test_every_attestations_error_has_its_python_class_with_the_abi_arguments() -> None:
    errors = [item for item in load_artifact("Attestations").abi if item["type"] == "error"]
    ours = [e for e in errors if str(e["name"]).startswith("Attestations")]
    assert len(ours) == 15
    for item in errors:
        cls = REVERT_CLASSES[item["name"]]
        names = [p["name"] for p in item["inputs"]]
        own = [n for n in vars(cls).get("__annotations__", {}) if n != "error_name"]
        assert own == names, item["name"]
