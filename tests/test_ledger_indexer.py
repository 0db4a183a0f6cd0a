"""The event indexer on SQLite and on a real PostgreSQL: every event folded in, resumable, idempotent, reorg-safe
(a reorg between reading logs and reading the end block, a reorg between syncs), transport errors that never touch
the index, and two processes syncing one index at once."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlmodel import Session, select
from web3 import HTTPProvider, Web3

from ledger import Anvil, AnvilConfig, Indexer, NodeRegistry, Role, deploy_all, dev_account, model_id
from ledger._indexer import CursorRow, IndexerUnavailable
from planetserve import ModelId
from tests.fixtures.chain import OWNER, SLASHER, TEST_PARAMS, ChainEnv, rpc

ETH = 10**18
KEY = bytes(range(1, 33))
MakeDb = Callable[..., str]


@pytest.fixture(params=["sqlite", "postgresql"])
def make_db(request: pytest.FixtureRequest, tmp_path: Path) -> MakeDb:
    """``make_db(name)``: the URL of a fresh, empty index database (SQLite file, or a database on the real server)."""
    if request.param == "sqlite":
        return lambda name="index": f"sqlite:///{tmp_path / f'{name}.sqlite'}"
    factory: MakeDb = request.getfixturevalue("postgres_db")
    return factory


class HookedProvider(HTTPProvider):
    """anvil's HTTP provider with hooks around each JSON-RPC call: the indexer's direct neighbour, faked.

    ``before(method)`` may raise (a transport failure); ``after(method)`` runs once the call answered (a reorg
    injected exactly between two of the indexer's calls).
    """

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.before: Callable[[str], None] | None = None
        self.after: Callable[[str], None] | None = None
        self.calls: list[str] = []

    def make_request(self, method: Any, params: Any) -> Any:
        self.calls.append(str(method))
        if self.before is not None:
            self.before(str(method))
        response = super().make_request(method, params)
        if self.after is not None:
            self.after(str(method))
        return response


def _hooked(chain: ChainEnv) -> tuple[NodeRegistry, HookedProvider]:
    provider = HookedProvider(chain.rpc_url)
    return NodeRegistry(Web3(provider), chain.deployment.registry_address), provider


def _register(reg: NodeRegistry, role: Role, stake: int, port: int, price: int | None = None) -> None:
    reg.register(
        role=role,
        endpoint=f"http://127.0.0.1:{port}",
        x25519_public_key=KEY,
        model_id=None if role is Role.RELAY else model_id("tiny-llama@v1"),
        price_per_1k_tokens=port if price is None else price,
        stake=stake,
    )


def _activity(chain: ChainEnv) -> None:
    """A little of everything: each role, stake, update, slash + jail + unjail, unbond, rebond, deregister."""
    _register(chain.registry(1), Role.MODEL, 2 * ETH, 9001)
    _register(chain.registry(2), Role.RELAY, ETH // 10, 9002)
    _register(chain.registry(3), Role.VERIFIER, 2 * ETH, 9003)
    _register(chain.registry(4), Role.MODEL, ETH, 9004)
    _register(chain.registry(5), Role.RELAY, ETH // 10, 9005)
    _register(chain.registry(6), Role.MODEL, 2 * ETH, 9006)
    chain.registry(1).add_stake(ETH)
    chain.registry(2).update(endpoint="http://127.0.0.1:9102", x25519_public_key=b"\x05" * 32, price_per_1k_tokens=5)
    chain.registry(OWNER).grant_slasher(chain.account(SLASHER).address)
    chain.registry(SLASHER).slash(chain.account(1).address, ETH // 2, b"\x0e" * 32)
    chain.registry(SLASHER).slash(chain.account(6).address, ETH // 2, b"\x0f" * 32)
    chain.registry(1).unjail()
    chain.registry(4).request_unbond()
    chain.registry(3).request_unbond()
    chain.registry(5).request_unbond()
    chain.registry(5).rebond()
    chain.advance(TEST_PARAMS.unbonding_delay)
    chain.registry(4).deregister()
    chain.registry(4).withdraw()


def _snapshot(indexer: Indexer) -> list[tuple[object, ...]]:
    fields: tuple[str, ...] = (
        "operator",
        "role",
        "endpoint",
        "x25519_public_key",
        "price_per_1k_tokens",
        "stake",
        "status",
    )
    fields += ("active", "jailed", "unbonding_ends_at")
    return [tuple(getattr(n, f) for f in fields) for n in indexer.nodes(include_deregistered=True)]


def _fresh(chain: ChainEnv, make_db: MakeDb, name: str) -> list[tuple[object, ...]]:
    """What a new index built now from the chain as it is says."""
    with Indexer(chain.registry(), chain.deployment, make_db(name), confirmations=0) as indexer:
        indexer.sync()
        return _snapshot(indexer)


def test_indexer_folds_every_event_into_tables(chain: ChainEnv, make_db: MakeDb) -> None:
    _activity(chain)
    with Indexer(chain.registry(), chain.deployment, make_db()) as indexer:
        report = indexer.sync()
        assert not report.reset and report.applied == indexer.event_count() and report.skipped == 0
        assert report.to_block == chain.w3.eth.block_number
        by_operator = {n.operator: n for n in indexer.nodes(include_deregistered=True)}
        a = chain.account
        one, two, three, four, five, six = (by_operator[a(i).address] for i in (1, 2, 3, 4, 5, 6))
        assert (one.stake, one.status, one.jailed, one.active) == (5 * ETH // 2, "active", False, True)
        assert (two.endpoint, two.x25519_public_key, two.price_per_1k_tokens) == (
            "http://127.0.0.1:9102",
            b"\x05" * 32,
            5,
        )
        assert two.model_id == ModelId.ZERO and two.role is Role.RELAY
        assert (three.status, three.active, three.unbonding_ends_at > 0) == ("unbonding", False, True)
        assert (four.status, four.stake) == ("deregistered", 0)
        assert (five.status, five.unbonding_ends_at, five.active) == ("active", 0, True)
        assert (six.stake, six.status, six.jailed, six.active) == (3 * ETH // 2, "active", True, False)
        assert {n.operator for n in indexer.nodes()} == {n.operator for n in (one, two, three, five, six)}
        assert indexer.stake_changes(a(1).address) == [
            ("register", 2 * ETH, 2 * ETH),
            ("add", ETH, 3 * ETH),
            ("slash", -ETH // 2, 5 * ETH // 2),
        ]
        assert indexer.stake_changes(a(4).address) == [("register", ETH, ETH), ("deregister", -ETH, 0)]
        # the index agrees with the contract on every bonded stake, on routability and on jail
        reg = chain.registry()
        for node in indexer.nodes():
            assert node.stake == reg.stake_of(node.operator)
            assert node.active == reg.is_active(node.operator)
            assert node.jailed == reg.is_jailed(node.operator)
        again = indexer.sync()
        assert (again.applied, again.skipped) == (0, 0)


def test_a_jailed_node_is_not_routable(chain: ChainEnv, make_db: MakeDb) -> None:
    _register(chain.registry(1), Role.MODEL, 2 * ETH, 9001)
    for i in (2, 3, 4):
        _register(chain.registry(i), Role.RELAY, ETH // 10, 9000 + i)
    chain.registry(OWNER).grant_slasher(chain.account(SLASHER).address)
    chain.registry(SLASHER).slash(chain.account(2).address, 1, b"\x01" * 32)
    chain.registry(SLASHER).slash(chain.account(1).address, 1, b"\x02" * 32)
    with Indexer(chain.registry(), chain.deployment, make_db()) as indexer:
        indexer.sync()
        routable = {n.operator for n in indexer.nodes() if n.active}  # what a client's directory keeps
        assert routable == {chain.account(3).address, chain.account(4).address}
        assert {n.operator for n in indexer.nodes() if n.jailed} == {chain.account(1).address, chain.account(2).address}
        chain.registry(1).unjail()
        indexer.sync()
        routable = {n.operator for n in indexer.nodes() if n.active}
        assert routable == {chain.account(i).address for i in (1, 3, 4)}


def test_indexer_resumes_after_stopping_mid_way(chain: ChainEnv, make_db: MakeDb) -> None:
    _activity(chain)
    head = chain.w3.eth.block_number
    middle = (chain.deployment.deploy_block + head) // 2
    with Indexer(chain.registry(), chain.deployment, make_db("full")) as full:
        full.sync()
        expected = _snapshot(full)
        total = full.event_count()
    partial_db = make_db("partial")
    with Indexer(chain.registry(), chain.deployment, partial_db) as first:
        part = first.sync(to_block=middle, batch_blocks=1)
        assert part.to_block == middle and first.last_block() == middle
        assert 0 < first.event_count() < total
    # a new process picks up at the cursor
    with Indexer(chain.registry(), chain.deployment, partial_db) as second:
        rest = second.sync(batch_blocks=3)
        assert rest.from_block == middle + 1 and not rest.reset
        assert part.applied + rest.applied == total
        assert _snapshot(second) == expected


def test_replaying_logs_is_idempotent(chain: ChainEnv, make_db: MakeDb) -> None:
    _activity(chain)
    with Indexer(chain.registry(), chain.deployment, make_db()) as indexer:
        indexer.sync()
        expected, total = _snapshot(indexer), indexer.event_count()
        # simulate a crash between applying logs and saving a cursor: rewind the cursor, keep the rows
        with Session(indexer._engine) as session:
            cursor = session.exec(select(CursorRow)).one()
            block_hash = chain.w3.eth.get_block(chain.deployment.deploy_block)["hash"]
            assert block_hash is not None
            cursor.last_block, cursor.last_block_hash = chain.deployment.deploy_block, block_hash.to_0x_hex()
            session.add(cursor)
            session.commit()
        replay = indexer.sync()
        assert replay.applied == 0 and replay.skipped > 0 and not replay.reset
        assert indexer.event_count() == total
        assert _snapshot(indexer) == expected


def test_a_reorg_between_reading_logs_and_the_end_block_is_caught(chain: ChainEnv, make_db: MakeDb) -> None:
    """The chain changes right after ``eth_getLogs`` answered: the orphaned logs never reach the index."""
    _register(chain.registry(1), Role.MODEL, 2 * ETH, 9001)
    fork = rpc(chain.w3, "evm_snapshot", [])
    _register(chain.registry(2), Role.RELAY, ETH // 10, 9002)  # both blocks are orphaned below
    chain.registry(1).add_stake(ETH)
    registry, provider = _hooked(chain)
    fired: list[str] = []

    def reorg_after_logs(method: str) -> None:
        if method == "eth_getLogs" and not fired:
            fired.append(method)
            assert rpc(chain.w3, "evm_revert", [fork]) is True
            _register(chain.registry(3), Role.VERIFIER, 2 * ETH, 9003)  # same height, other blocks
            _register(chain.registry(4), Role.RELAY, ETH // 10, 9004)

    provider.after = reorg_after_logs
    with Indexer(registry, chain.deployment, make_db(), confirmations=0) as indexer:
        report = indexer.sync()
        assert fired and not report.reset
        operators = {n.operator for n in indexer.nodes()}
        assert operators == {chain.account(i).address for i in (1, 3, 4)}
        assert indexer.stake_changes(chain.account(1).address) == [("register", 2 * ETH, 2 * ETH)]
        assert _snapshot(indexer) == _fresh(chain, make_db, "fresh")


def test_a_reorg_between_syncs_rolls_back_to_the_common_ancestor(chain: ChainEnv, make_db: MakeDb) -> None:
    _register(chain.registry(1), Role.MODEL, 2 * ETH, 9001)
    _register(chain.registry(2), Role.RELAY, ETH // 10, 9002)
    with Indexer(chain.registry(), chain.deployment, make_db(), confirmations=0) as indexer:
        indexer.sync()
        kept = indexer.event_count()
        fork = rpc(chain.w3, "evm_snapshot", [])
        chain.registry(2).update(
            endpoint="http://127.0.0.1:9102", x25519_public_key=b"\x07" * 32, price_per_1k_tokens=7
        )
        chain.registry(1).add_stake(ETH)
        chain.registry(OWNER).grant_slasher(chain.account(SLASHER).address)
        chain.registry(SLASHER).slash(chain.account(1).address, ETH // 2, b"\x0e" * 32)
        _register(chain.registry(5), Role.RELAY, ETH // 10, 9005)
        indexer.sync()
        orphaned = indexer.event_count() - kept
        assert rpc(chain.w3, "evm_revert", [fork]) is True
        _register(chain.registry(3), Role.VERIFIER, 2 * ETH, 9003)  # a shorter chain than the indexed one
        report = indexer.sync()
        assert not report.reset and report.rolled_back == orphaned > 0
        assert indexer.stake_changes(chain.account(1).address) == [("register", 2 * ETH, 2 * ETH)]
        assert chain.account(5).address not in {n.operator for n in indexer.nodes()}
        assert indexer.event_count() == kept + 1
        assert _snapshot(indexer) == _fresh(chain, make_db, "fresh")


def test_only_confirmed_blocks_are_indexed(chain: ChainEnv, make_db: MakeDb) -> None:
    with Indexer(chain.registry(), chain.deployment, make_db("default")) as default:
        assert default.confirmations == 0  # a local dev chain mines on demand
    public = dataclasses.replace(chain.deployment, chain_id=1)
    with Indexer(chain.registry(), public, make_db("public")) as other:
        assert other.confirmations == 2
    for i in (1, 2, 3):
        _register(chain.registry(i), Role.RELAY, ETH // 10, 9000 + i)
    with Indexer(chain.registry(), chain.deployment, make_db(), confirmations=2) as indexer:
        report = indexer.sync()
        assert report.to_block == chain.w3.eth.block_number - 2
        assert [n.operator for n in indexer.nodes()] == [chain.account(1).address]
        rpc(chain.w3, "evm_mine", [])
        rpc(chain.w3, "evm_mine", [])
        indexer.sync()
        assert len(indexer.nodes()) == 3


def test_a_transport_error_mid_sync_is_raised_and_leaves_the_index_intact(chain: ChainEnv, make_db: MakeDb) -> None:
    _activity(chain)
    expected = _fresh(chain, make_db, "fresh")
    registry, provider = _hooked(chain)
    failing: set[str] = set()
    logs_read = {"n": 0}

    def flaky(method: str) -> None:
        if method == "eth_getLogs":
            logs_read["n"] += 1
            if logs_read["n"] == 4:  # three batches in, the endpoint goes away
                failing.add("*")
        if "*" in failing or method in failing:
            raise requests.ConnectionError("connection refused (injected)")

    provider.before = flaky
    with Indexer(registry, chain.deployment, make_db(), confirmations=0, retries=2, backoff_s=0.01) as indexer:
        with pytest.raises(IndexerUnavailable) as failure:
            indexer.sync(batch_blocks=3)
        assert failure.value.attempts == 3 and failure.value.method == "eth_getLogs"
        assert "\n" not in str(failure.value)
        last, count = indexer.last_block(), indexer.event_count()
        assert last == chain.deployment.deploy_block + 8 and count > 0
        # the head answers but blocks do not, so the check of the cursor's block fails: an error, never a wipe
        failing.clear()
        failing.add("eth_getBlockByNumber")
        with pytest.raises(IndexerUnavailable) as again:
            indexer.sync(batch_blocks=3)
        assert again.value.method == "eth_getBlockByNumber"
        assert (indexer.last_block(), indexer.event_count()) == (last, count)
        failing.clear()
        report = indexer.sync(batch_blocks=3)
        assert not report.reset and report.from_block == last + 1
        assert _snapshot(indexer) == expected


def test_a_transient_transport_error_is_retried(chain: ChainEnv, make_db: MakeDb) -> None:
    _activity(chain)
    registry, provider = _hooked(chain)
    failures = {"left": 2}

    def blip(method: str) -> None:
        if method == "eth_getBlockByNumber" and failures["left"]:
            failures["left"] -= 1
            raise requests.Timeout("read timed out (injected)")

    provider.before = blip
    with Indexer(registry, chain.deployment, make_db(), confirmations=0, retries=2, backoff_s=0.01) as indexer:
        report = indexer.sync()
        assert failures["left"] == 0 and not report.reset
        assert _snapshot(indexer) == _fresh(chain, make_db, "fresh")


_WORKER = """
import sys
from pathlib import Path
from web3 import HTTPProvider, Web3
from ledger import Indexer, NodeRegistry, load_deployment
deployment = load_deployment(Path(sys.argv[2]))
registry = NodeRegistry(Web3(HTTPProvider(sys.argv[1])), deployment.registry_address)
with Indexer(registry, deployment, sys.argv[3], confirmations=0) as indexer:
    report = indexer.sync(batch_blocks=1)
print(report.applied)
"""


def test_two_processes_syncing_one_index_both_finish(chain: ChainEnv, make_db: MakeDb) -> None:
    _activity(chain)
    expected = _fresh(chain, make_db, "fresh")
    db = make_db()
    args = [sys.executable, "-c", _WORKER, chain.rpc_url, str(chain.deployment_path), db]
    workers = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    applied = 0
    for worker in workers:
        out, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err[-2000:]
        applied += int(out.strip())
    with Indexer(chain.registry(), chain.deployment, db) as indexer:
        assert applied == indexer.event_count()  # every log applied exactly once across the processes
        assert _snapshot(indexer) == expected


def test_indexer_rebuilds_after_an_anvil_restart(tmp_path: Path, make_db: MakeDb) -> None:
    db = make_db()
    with Anvil() as first:
        w3 = first.web3()
        dep = deploy_all(w3, dev_account(0), TEST_PARAMS, path=tmp_path / "d1.json")
        reg = NodeRegistry(w3, dep.registry_address, dev_account(1))
        _register(reg, Role.MODEL, ETH, 9001)
        _register(reg.with_account(dev_account(2)), Role.RELAY, ETH // 10, 9002)
        with Indexer(reg, dep, db) as indexer:
            indexer.sync()
            assert len(indexer.nodes()) == 2
    with Anvil() as second:  # a fresh chain: same deployer nonce, same registry address, different history
        w3 = second.web3()
        dep2 = deploy_all(w3, dev_account(0), TEST_PARAMS, path=tmp_path / "d2.json")
        assert dep2.registry_address == dep.registry_address
        reg2 = NodeRegistry(w3, dep2.registry_address, dev_account(3))
        _register(reg2, Role.VERIFIER, 2 * ETH, 9003)
        with Indexer(reg2, dep2, db) as indexer:
            report = indexer.sync()
            # anvil started in the same second mines identical early blocks: those are a common ancestor
            # (how many events are undone depends on which early blocks match: at least the two registrations)
            assert report.reset or report.rolled_back >= 2
            nodes = indexer.nodes(include_deregistered=True)
            assert [n.operator for n in nodes] == [dev_account(3).address]
            with Indexer(reg2, dep2, make_db("fresh")) as fresh:
                assert fresh.sync().applied == indexer.event_count()


def test_persisted_chain_keeps_its_index(tmp_path: Path, make_db: MakeDb) -> None:
    state = tmp_path / "state" / "anvil.json"
    db = make_db()
    with Anvil(AnvilConfig(state_file=state)) as first:
        w3 = first.web3()
        dep = deploy_all(w3, dev_account(0), TEST_PARAMS, path=tmp_path / "d.json")
        reg = NodeRegistry(w3, dep.registry_address, dev_account(1))
        _register(reg, Role.MODEL, ETH, 9001)
        with Indexer(reg, dep, db) as indexer:
            indexer.sync()
            expected = _snapshot(indexer)
    assert state.exists()
    with Anvil(AnvilConfig(state_file=state)) as again:
        w3 = again.web3()
        reg = NodeRegistry(w3, dep.registry_address, dev_account(2))
        dep.verify(w3)
        assert reg.get_node(dev_account(1).address) is not None
        _register(reg, Role.RELAY, ETH // 10, 9002)
        with Indexer(reg, dep, db) as indexer:
            report = indexer.sync()
            nodes = _snapshot(indexer)
            assert expected[0] in nodes and len(nodes) == 2
            # anvil restores blocks with their hashes, so nothing is re-indexed from scratch
            assert not report.reset and report.applied == 1


@pytest.mark.parametrize("batch", [1, 1000])
def test_batch_size_does_not_change_the_result(chain: ChainEnv, make_db: MakeDb, batch: int) -> None:
    _activity(chain)
    with Indexer(chain.registry(), chain.deployment, make_db()) as indexer:
        indexer.sync(batch_blocks=batch)
        assert len(indexer.nodes(include_deregistered=True)) == 6


def test_stakes_above_2_63_and_2_128_sort_and_sum_exactly(chain: ChainEnv, make_db: MakeDb) -> None:
    # anvil 1.7 refuses a single transfer of 2**128 wei or more, so the largest stakes grow by several add_stake
    stakes = {5: 2**63 + 1, 6: 2**127, 7: 2**63 - 1, 8: 10 * ETH, 9: 2**127 + 3}
    for i, stake in stakes.items():
        rpc(chain.w3, "anvil_setBalance", [chain.account(i).address, hex(2**135)])
        _register(chain.registry(i), Role.MODEL, stake, 9000 + i, price=2**255 + i)
    for _ in range(3):
        chain.registry(6).add_stake(2**127)
    chain.registry(9).add_stake(2**127 - 1)
    stakes[6], stakes[9] = 2**129, 2**128 + 2
    with Indexer(chain.registry(), chain.deployment, make_db()) as indexer:
        indexer.sync()
        ordered = sorted(stakes, key=lambda i: -stakes[i])
        top = indexer.largest_stakes(3, role=Role.MODEL)
        assert [n.operator for n in top] == [chain.account(i).address for i in ordered[:3]]
        assert [n.stake for n in top] == [stakes[i] for i in ordered[:3]]
        assert indexer.total_stake() == sum(stakes.values()) == chain.registry().total_staked()
        assert {n.price_per_1k_tokens for n in indexer.nodes()} == {2**255 + i for i in stakes}
        assert indexer.stake_changes(chain.account(6).address)[-1] == ("add", 2**127, 2**129)
