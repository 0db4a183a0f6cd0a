"""Shutdowns that release everything however they end: one failing stop does not leave the rest running."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import Engine
from sqlmodel import Session, create_engine, select

from cli._node_reforward import NodeReforward, reforward_wallet
from cli.exit_codes import ExitCode
from ledger import ChainError, ChannelInfo, Indexer, VoucherDomain, VoucherStore, checksum, dev_account
from ledger._voucher_store import StoredVoucher
from node.overlay._directory import Directory
from node.overlay._lifecycle import stop_all
from node.overlay._localnet import LocalNetwork, LocalNode
from node.overlay._reforward import ReforwardConfig, Reforwarder
from node.overlay._serve import registry_directory_source, registry_peer_directory
from node.testing import NodeProcess, NodeSpec, ProcessNetwork
from tests._cli import InProcess, assert_failed, cli_env, ok_json
from tests.fixtures.chain import ChainEnv


async def _echo(request: bytes) -> AsyncIterator[bytes]:
    yield request


class _StopFails(LocalNode):
    """A node whose stop raises before stopping anything (the failure to survive); ``release`` stops it for real."""

    async def stop(self) -> None:
        raise RuntimeError(f"{self.name} would not stop")

    async def release(self) -> None:
        await LocalNode.stop(self)


def _failing(node: LocalNode) -> _StopFails:
    fields = {f.name: getattr(node, f.name) for f in dataclasses.fields(node)}
    return _StopFails(**fields)


async def _listening(endpoint: str) -> bool:
    host, port = endpoint.removeprefix("http://").rsplit(":", 1)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout=2.0)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


async def test_local_network_close_stops_every_node_when_some_stops_fail_and_raises_the_first() -> None:
    net = LocalNetwork(relays=4, handler=_echo)
    await net.__aenter__()
    broken = [_failing(net.relay_nodes[1]), _failing(net.relay_nodes[2])]
    net.relay_nodes[1:3] = broken
    try:
        with pytest.raises(RuntimeError, match="relay1 would not stop"):
            await net.close()
        others = [n for n in net.nodes() if not isinstance(n, _StopFails)]
        assert len(others) == 3
        for node in others:
            assert not node.running
            assert not await _listening(node.endpoint), node.name
        for node in broken:
            assert await _listening(node.endpoint)  # its stop failed: only it is left
    finally:
        for node in broken:
            await node.release()


async def test_stop_all_runs_every_stop_after_a_cancellation_and_reraises_it() -> None:
    ran: list[str] = []

    async def cancelled() -> None:
        ran.append("cancelled")
        raise asyncio.CancelledError

    async def fine() -> None:
        ran.append("fine")

    with pytest.raises(asyncio.CancelledError):
        await stop_all([fine, cancelled, fine])
    assert ran == ["fine", "cancelled", "fine"]


class _ReleaseFails(NodeProcess):
    def release(self) -> None:
        raise RuntimeError(f"{self.spec.name}: release failed")


def _sleeper(name: str, tmp_path: Path, cls: type[NodeProcess] = NodeProcess) -> NodeProcess:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    spec = NodeSpec(name=name, role="relay", account_index=1, stake_wei=1)
    return cls(spec=spec, proc=proc, state_dir=tmp_path / name)


def test_process_network_stop_ends_and_releases_every_process_when_one_release_fails(tmp_path: Path) -> None:
    nodes = [
        _sleeper("a", tmp_path, _ReleaseFails),
        _sleeper("b", tmp_path),
        _sleeper("c", tmp_path, _ReleaseFails),
    ]
    network = ProcessNetwork(rpc_url="", deployment=tmp_path, state_root=tmp_path, nodes=[], running=nodes)
    try:
        with pytest.raises(RuntimeError, match="a: release failed"):
            network.stop()
        assert all(not n.alive() for n in nodes)
        assert nodes[1].proc.stdout is not None and nodes[1].proc.stdout.closed
        assert nodes[1].proc.stderr is not None and nodes[1].proc.stderr.closed
    finally:
        for node in nodes:
            if node.alive():
                node.proc.kill()
                node.proc.wait(timeout=10)
            NodeProcess.release(node)


class _NoChannels:
    """The store's chain neighbour; these tests never accept a voucher, so it is never asked."""

    def channel(self, channel_id: int) -> ChannelInfo | None:
        raise AssertionError("not read")


def _open_files(path: Path) -> int:
    """This process's open file descriptors on ``path`` (SQLite holds one per pooled connection)."""
    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            if Path(os.readlink(fd)) == path:
                count += 1
    return count


def _store(url: str | Engine) -> VoucherStore:
    domain = VoucherDomain(chain_id=31337, contract=checksum("0x" + "11" * 20))
    return VoucherStore(url, domain=domain, node="0x" + "22" * 20, channels=_NoChannels())


def test_voucher_store_close_releases_its_database_files_and_refuses_further_use(tmp_path: Path) -> None:
    db = tmp_path / "vouchers.sqlite"
    store = _store(f"sqlite:///{db}")
    assert store.books() == []
    assert _open_files(db) >= 1  # the pool keeps its connection: only close (or the collector) releases it
    store.close()
    assert _open_files(db) == 0
    store.close()  # idempotent
    with pytest.raises(ChainError, match="closed"):
        store.books()
    with _store(f"sqlite:///{db}") as again:
        assert again.redeemable() == []
        assert _open_files(db) >= 1
    assert _open_files(db) == 0


def test_voucher_store_close_leaves_an_engine_it_was_given_to_its_owner(tmp_path: Path) -> None:
    db = tmp_path / "vouchers.sqlite"
    engine = create_engine(f"sqlite:///{db}")
    try:
        with _store(engine) as store:
            store.books()
        assert _open_files(db) >= 1
        with Session(engine) as session:  # still usable by its owner
            assert session.exec(select(StoredVoucher)).all() == []
    finally:
        engine.dispose()
    assert _open_files(db) == 0


def _open_under(folder: Path) -> list[str]:
    """This process's open files inside ``folder``."""
    found = []
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith(f"{folder}/"):
                found.append(target)
    return found


async def _released(folder: Path, timeout_s: float = 20.0) -> list[str]:
    """The files still open under ``folder`` once a read under way had time to end (it releases what it held)."""
    deadline = time.monotonic() + timeout_s
    while (left := _open_under(folder)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return left


async def test_registry_peer_directory_close_closes_its_registry_index(chain: ChainEnv, tmp_path: Path) -> None:
    directory = registry_peer_directory(
        chain.rpc_url, chain.deployment_path, f"sqlite:///{tmp_path / 'index.sqlite'}", refresh_interval_s=60
    )
    assert await directory.refresh()
    assert _open_under(tmp_path)  # the index keeps its pooled connection between refreshes
    directory.close()
    assert await _released(tmp_path) == []
    assert not await directory.refresh()  # a closed index reads nothing (and opens nothing)
    assert _open_under(tmp_path) == []


async def test_registry_directory_source_close_closes_its_index_also_during_a_read(
    chain: ChainEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = registry_directory_source(chain.rpc_url, chain.deployment_path, f"sqlite:///{tmp_path / 'i.sqlite'}")
    await source()
    assert _open_under(tmp_path)
    sync = Indexer.sync
    reading = threading.Event()

    def slow_sync(self: Indexer, **kwargs: Any) -> Any:
        reading.set()
        time.sleep(0.3)
        return sync(self, **kwargs)

    monkeypatch.setattr(Indexer, "sync", slow_sync)
    source._read_at = -float("inf")  # due for a refresh
    read = asyncio.ensure_future(source())
    assert await asyncio.to_thread(reading.wait, 10)
    source.close()  # mid-read: it does not wait, the read releases the index when it ends
    assert isinstance(await asyncio.wait_for(read, 10), Directory)
    assert await _released(tmp_path) == []


class _CloseFails:
    """The re-forwarder's stand-in: its close raises (what the node's other closes must survive)."""

    config = ReforwardConfig(operator="0x" + "33" * 20, queue_bound=1)

    async def close(self) -> None:
        raise RuntimeError("re-forwarder close failed")


async def test_node_reforward_close_releases_wallet_and_index_when_the_reforwarder_close_fails(
    chain: ChainEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PS_PRIVATE_KEY", dev_account(8).key.hex())
    wallet = reforward_wallet(chain.rpc_url, chain.deployment_path, tmp_path, budget_eth="0.01", deposit_eth="0.002")
    assert wallet is not None
    source = registry_directory_source(chain.rpc_url, chain.deployment_path, f"sqlite:///{tmp_path / 'r.sqlite'}")
    await source()
    assert any("reforward-wallet" in f for f in _open_under(tmp_path)) and any(
        "r.sqlite" in f for f in _open_under(tmp_path)
    )
    reforward = NodeReforward(reforwarder=cast(Reforwarder, _CloseFails()), wallet=wallet, source=source)
    with pytest.raises(RuntimeError, match="re-forwarder close failed"):
        await reforward.close()
    assert await _released(tmp_path) == []


def test_serve_that_cannot_listen_closes_engine_wallet_book_and_indexes(
    chain: ChainEnv,
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    state = tmp_path / "state"
    env = cli_env(chain, tmp_path, 8, PS_STATE_DIR=str(state))
    args = ["serve", "--role", "model", "--engine", "torch", "--device", "cpu", "--model-dir", str(tiny_model_dir)]
    # 192.0.2.1 (TEST-NET-1) is no address of this machine: the app starts, then the bind fails.
    args += ["--host", "192.0.2.1", "--port", "0", "--reforward-bound", "1"]
    engines = {t for t in threading.enumerate() if t.name == "torch-engine"}
    failed = InProcess(monkeypatch, capsys)("node", args, env)
    assert_failed(failed, ExitCode.INVALID_INPUT, "not an address of this machine")
    assert asyncio.run(_released(state)) == []
    assert {t for t in threading.enumerate() if t.name == "torch-engine"} <= engines  # the engine's worker ended


def test_earnings_and_claim_close_the_voucher_book(
    chain: ChainEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    env = cli_env(chain, tmp_path, 8, PS_STATE_DIR=str(state))
    inproc = InProcess(monkeypatch, capsys)
    shown = ok_json(inproc("node", ["earnings", "--json"], env))
    assert shown["channels"] == 0
    assert (state / f"vouchers-{chain.w3.eth.chain_id}.sqlite").exists() and _open_under(state) == []
    claimed = ok_json(inproc("node", ["claim", "--json"], env))
    assert claimed["channels"] == 0 and _open_under(state) == []


def test_serve_stopped_by_sigterm_leaves_no_file_of_its_state_open(
    chain: ChainEnv,
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    state = tmp_path / "state"
    env = cli_env(chain, tmp_path, 8, PS_STATE_DIR=str(state))
    args = ["serve", "--role", "model", "--engine", "torch", "--device", "cpu", "--model-dir", str(tiny_model_dir)]
    args += ["--port", "0", "--registry-refresh", "1", "--reforward-bound", "1"]
    seen: list[str] = []

    def stop_once_serving() -> None:
        # Both files are opened by the running app (its registry refresh and its redeemer), so by then the command
        # handles SIGTERM itself (its handler is installed before the app starts).
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            open_now = _open_under(state)
            if any("registry-index" in f for f in open_now) and any("vouchers-" in f for f in open_now):
                seen.extend(open_now)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.05)

    stopper = threading.Thread(target=stop_once_serving, daemon=True)
    stopper.start()
    stopped = InProcess(monkeypatch, capsys)("node", args, env)
    stopper.join(timeout=5)
    assert seen, "the node never opened its registry index and voucher book"
    assert stopped.returncode == 0, stopped.stderr
    assert asyncio.run(_released(state)) == []
