"""Shutdowns that release everything however they end: one failing stop does not leave the rest running."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from node.overlay._localnet import LocalNetwork, LocalNode, stop_all
from node.testing import NodeProcess, NodeSpec, ProcessNetwork


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
