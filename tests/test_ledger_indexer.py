"""The event indexer: every event folded in, resumable mid-way, idempotent, and safe across anvil restarts."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlmodel import Session, select

from ledger import Anvil, AnvilConfig, Indexer, NodeRegistry, Role, deploy_all, dev_account, model_id
from ledger._indexer import CursorRow
from tests.fixtures.chain import OWNER, SLASHER, TEST_PARAMS, ChainEnv

ETH = 10**18
KEY = bytes(range(1, 33))


def _register(reg: NodeRegistry, role: Role, stake: int, port: int) -> None:
    reg.register(
        role=role,
        endpoint=f"http://127.0.0.1:{port}",
        x25519_public_key=KEY,
        model_id=None if role is Role.RELAY else model_id("tiny-llama@v1"),
        price_per_1k_tokens=port,
        stake=stake,
    )


def _activity(chain: ChainEnv) -> None:
    """A little of everything: registrations of each role, stake, update, slash, unbond, deregister."""
    _register(chain.registry(1), Role.MODEL, 2 * ETH, 9001)
    _register(chain.registry(2), Role.RELAY, ETH // 10, 9002)
    _register(chain.registry(3), Role.VERIFIER, 2 * ETH, 9003)
    _register(chain.registry(4), Role.MODEL, ETH, 9004)
    chain.registry(1).add_stake(ETH)
    chain.registry(2).update(endpoint="http://127.0.0.1:9102", x25519_public_key=b"\x05" * 32, price_per_1k_tokens=5)
    chain.registry(OWNER).grant_slasher(chain.account(SLASHER).address)
    chain.registry(SLASHER).slash(chain.account(1).address, ETH // 2, b"\x0e" * 32)
    chain.registry(1).unjail()  # a slash jails; the stake is still above the minimum, so the operator may leave
    chain.registry(4).request_unbond()
    chain.registry(3).request_unbond()
    chain.advance(TEST_PARAMS.unbonding_delay)
    chain.registry(4).deregister()
    chain.registry(4).withdraw()


def _snapshot(indexer: Indexer) -> list[tuple[object, ...]]:
    return [
        (n.operator, n.role, n.endpoint, n.x25519_public_key, n.price_per_1k_tokens, n.stake, n.status, n.active)
        for n in indexer.nodes(include_deregistered=True)
    ]


def _db(tmp_path: Path, name: str = "index") -> str:
    return f"sqlite:///{tmp_path / f'{name}.sqlite'}"


def test_indexer_folds_every_event_into_tables(chain: ChainEnv, tmp_path: Path) -> None:
    _activity(chain)
    with Indexer(chain.registry(), chain.deployment, _db(tmp_path)) as indexer:
        report = indexer.sync()
        assert not report.reset and report.applied == indexer.event_count() and report.skipped == 0
        assert report.to_block == chain.w3.eth.block_number
        by_operator = {n.operator: n for n in indexer.nodes(include_deregistered=True)}
        a = chain.account
        one, two, three, four = (by_operator[a(i).address] for i in (1, 2, 3, 4))
        assert (one.stake, one.status, one.active) == (5 * ETH // 2, "active", True)
        assert (two.endpoint, two.x25519_public_key, two.price_per_1k_tokens) == (
            "http://127.0.0.1:9102",
            b"\x05" * 32,
            5,
        )
        assert two.model_id == bytes(32) and two.role is Role.RELAY
        assert (three.status, three.active, three.unbonding_ends_at > 0) == ("unbonding", False, True)
        assert (four.status, four.stake) == ("deregistered", 0)
        assert {n.operator for n in indexer.nodes()} == {one.operator, two.operator, three.operator}
        assert indexer.stake_changes(a(1).address) == [
            ("register", 2 * ETH, 2 * ETH),
            ("add", ETH, 3 * ETH),
            ("slash", -ETH // 2, 5 * ETH // 2),
        ]
        assert indexer.stake_changes(a(4).address) == [("register", ETH, ETH), ("deregister", -ETH, 0)]
        # the index agrees with the contract on every bonded stake
        reg = chain.registry()
        for node in indexer.nodes():
            assert node.stake == reg.stake_of(node.operator)
            assert node.active == reg.is_active(node.operator)
        again = indexer.sync()
        assert (again.applied, again.skipped) == (0, 0)


def test_indexer_resumes_after_stopping_mid_way(chain: ChainEnv, tmp_path: Path) -> None:
    _activity(chain)
    head = chain.w3.eth.block_number
    middle = (chain.deployment.deploy_block + head) // 2
    with Indexer(chain.registry(), chain.deployment, _db(tmp_path, "full")) as full:
        full.sync()
        expected = _snapshot(full)
        total = full.event_count()
    with Indexer(chain.registry(), chain.deployment, _db(tmp_path, "partial")) as first:
        part = first.sync(to_block=middle, batch_blocks=1)
        assert part.to_block == middle and first.last_block() == middle
        assert 0 < first.event_count() < total
    # a new process picks up at the cursor
    with Indexer(chain.registry(), chain.deployment, _db(tmp_path, "partial")) as second:
        rest = second.sync(batch_blocks=3)
        assert rest.from_block == middle + 1 and not rest.reset
        assert part.applied + rest.applied == total
        assert _snapshot(second) == expected


def test_replaying_logs_is_idempotent(chain: ChainEnv, tmp_path: Path) -> None:
    _activity(chain)
    with Indexer(chain.registry(), chain.deployment, _db(tmp_path)) as indexer:
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


def test_indexer_rebuilds_after_an_anvil_restart(tmp_path: Path) -> None:
    db = _db(tmp_path)
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
            assert report.reset
            nodes = indexer.nodes(include_deregistered=True)
            assert [n.operator for n in nodes] == [dev_account(3).address]
            assert indexer.event_count() == report.applied


def test_persisted_chain_keeps_its_index(tmp_path: Path) -> None:
    state = tmp_path / "state" / "anvil.json"
    db = _db(tmp_path)
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
def test_batch_size_does_not_change_the_result(chain: ChainEnv, tmp_path: Path, batch: int) -> None:
    _activity(chain)
    with Indexer(chain.registry(), chain.deployment, _db(tmp_path)) as indexer:
        indexer.sync(batch_blocks=batch)
        assert len(indexer.nodes(include_deregistered=True)) == 4
