"""Wei amounts in SQL: exact round trips, numeric order and exact sums on SQLite and on a real PostgreSQL; an index
database URL whose driver is missing fails with one line naming the extra; an index from an older layout is rebuilt."""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Column, Engine, Integer, MetaData, Table, create_engine, func, insert, inspect, select
from sqlalchemy.exc import StatementError
from sqlalchemy.orm import Session

from ledger import ChainError, Indexer, Role
from ledger._amount import WeiAmount, decode_wei, encode_wei, sum_wei
from ledger._indexer import DatabaseDriverMissing
from tests.fixtures.chain import ChainEnv

#: Around every boundary that breaks a naive column: 2**53 (floats), 2**63 (SQLite INTEGER), 2**128, 2**256 - 1.
VALUES = [
    0,
    1,
    9,
    10,
    2**53 + 1,
    2**63 - 1,
    2**63,
    2**64 + 5,
    10**30,
    2**128 - 1,
    2**128,
    2**128 + 1,
    2**255,
    2**256 - 1,
]
SIGNED = [-(2**256 - 1), -(2**128), -(2**63), -10, -9, -1, *VALUES]


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'amounts.sqlite'}"
    else:
        make: Callable[[str], str] = request.getfixturevalue("postgres_db")
        url = make("amounts")
    db = create_engine(url)
    yield db
    db.dispose()


def _table(engine: Engine) -> Table:
    metadata = MetaData()
    table = Table(
        "amounts",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("wei", WeiAmount()),
        Column("delta", WeiAmount(signed=True)),
    )
    metadata.create_all(engine)
    return table


def test_amounts_round_trip_sort_and_sum_exactly(engine: Engine) -> None:
    table = _table(engine)
    rows: list[dict[str, int | None]] = [
        {"id": i, "wei": v, "delta": d} for i, (v, d) in enumerate(zip(reversed(VALUES), SIGNED, strict=False))
    ]
    rows += [{"id": 100 + i, "wei": None, "delta": d} for i, d in enumerate(SIGNED[len(VALUES) :])]
    with Session(engine) as session:
        session.execute(insert(table), rows)
        session.commit()
        assert (
            list(session.execute(select(table.c.wei).where(table.c.wei.is_not(None)).order_by(table.c.wei)).scalars())
            == VALUES
        )
        assert list(session.execute(select(table.c.delta).order_by(table.c.delta)).scalars()) == SIGNED
        assert sum_wei(session, table.c.wei) == sum(VALUES)
        assert sum_wei(session, table.c.delta) == sum(SIGNED)
        assert sum_wei(session, table.c.wei, table.c.wei > 2**63) == sum(v for v in VALUES if v > 2**63)
        assert sum_wei(session, table.c.wei, table.c.id < 0) == 0
        assert session.execute(select(func.max(table.c.wei))).scalar_one() == 2**256 - 1
        assert session.execute(select(func.min(table.c.delta))).scalar_one() == -(2**256 - 1)
        above = session.execute(select(table.c.wei).where(table.c.wei >= 2**128).order_by(table.c.wei)).scalars()
        assert list(above) == [v for v in VALUES if v >= 2**128]


def test_postgres_stores_amounts_as_numeric_78_0(engine: Engine) -> None:
    _table(engine)
    columns = {c["name"]: c["type"] for c in inspect(engine).get_columns("amounts")}
    if engine.dialect.name == "postgresql":
        assert [(t.precision, t.scale) for t in (columns["wei"], columns["delta"])] == [(78, 0), (78, 0)]  # type: ignore[attr-defined]
    else:
        assert "VARCHAR" in str(columns["wei"])


@pytest.mark.parametrize("value", [-1, 2**256, True, "5"])
def test_out_of_range_amounts_are_refused(engine: Engine, value: object) -> None:
    table = _table(engine)
    with Session(engine) as session, pytest.raises(StatementError):
        session.execute(insert(table), [{"id": 1, "wei": value}])


def test_the_string_encoding_orders_like_the_numbers() -> None:
    assert sorted(SIGNED, key=lambda v: encode_wei(v, signed=True)) == SIGNED
    assert sorted(VALUES, key=encode_wei) == VALUES
    assert all(decode_wei(encode_wei(v, signed=True)) == v for v in SIGNED)
    assert decode_wei("1000") == 1000


def test_a_postgres_url_without_its_driver_names_the_extra(chain: ChainEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if the extra were not installed
    with pytest.raises(DatabaseDriverMissing) as failure:
        Indexer(chain.registry(), chain.deployment, "postgresql://user:secret@127.0.0.1:1/index")
    message = str(failure.value)
    assert isinstance(failure.value, ChainError) and failure.value.extra == "postgres"
    assert "pip install 'planetserve[postgres]'" in message and "\n" not in message and "secret" not in message


def test_an_index_from_an_older_layout_is_rebuilt(chain: ChainEnv, tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as old:  # the layout before amounts and block hashes were stored
        old.execute(
            "CREATE TABLE ledger_events (source TEXT, block_number INT, log_index INT, tx_hash TEXT, name TEXT)"
        )
        old.execute("INSERT INTO ledger_events VALUES ('x', 1, 0, '0x', 'NodeRegistered')")
    chain.registry(1).register(
        role=Role.RELAY,
        endpoint="http://127.0.0.1:9001",
        x25519_public_key=bytes(range(32)),
        model_id=None,
        price_per_1k_tokens=1,
        stake=10**17,
    )
    with Indexer(chain.registry(), chain.deployment, f"sqlite:///{path}") as indexer:
        report = indexer.sync()
        assert report.applied == indexer.event_count() >= 1
        assert [n.operator for n in indexer.nodes()] == [chain.account(1).address]


def test_an_in_memory_sqlite_index_sees_its_own_writes(chain: ChainEnv) -> None:
    chain.registry(2).register(
        role=Role.RELAY,
        endpoint="http://127.0.0.1:9002",
        x25519_public_key=bytes(range(32)),
        model_id=None,
        price_per_1k_tokens=1,
        stake=10**17,
    )
    with Indexer(chain.registry(), chain.deployment, "sqlite://") as indexer:
        assert indexer.sync().applied >= 1
        assert [n.operator for n in indexer.nodes()] == [chain.account(2).address]
