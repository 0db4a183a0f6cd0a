"""Networks of separate ``ps-node serve`` processes on an anvil of a test module's own: the set-up that
``tests/test_net_processes.py`` and ``tests/test_net_reforward_paid.py`` each wrote out.

A module builds its fixtures from :func:`own_chain` and :func:`process_network` (module-scoped there: starting model
processes costs seconds), finds its nodes with :func:`node_named`, gives a client one model node with
:func:`only_model` and reads a node's real state (not its heartbeat's) with :func:`metric`. Each context manager
stops what it started however the module ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import aiohttp
import pytest

from ledger import Anvil, AnvilConfig, deploy_all, dev_account
from node.client import DirectorySource
from node.client._registry import RegistryDirectory
from node.overlay import Directory
from node.testing import NodeProcess, NodeSpec, ProcessNetwork
from tests.fixtures.chain import TEST_PARAMS

#: Seconds :func:`metric` waits for one ``/metrics`` read.
METRICS_TIMEOUT_S = 30.0


@contextlib.contextmanager
def own_chain(tmp_path_factory: pytest.TempPathFactory, *, accounts: int) -> Iterator[tuple[str, Path]]:
    """An anvil with ``accounts`` dev accounts and the contracts deployed: (RPC URL, deployment file)."""
    with Anvil(AnvilConfig(accounts=accounts)) as anvil:
        path = tmp_path_factory.mktemp("deployment") / "deployment.json"
        deploy_all(anvil.web3(), dev_account(0), TEST_PARAMS, path=path)
        yield anvil.rpc_url, path


@contextlib.contextmanager
def process_network(
    chain: tuple[str, Path],
    model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    specs: Sequence[NodeSpec],
    *,
    extra_env: Mapping[str, str] | None = None,
) -> Iterator[ProcessNetwork]:
    """The nodes of ``specs`` registered on ``chain`` and serving (models from ``model_dir``); stopped on exit."""
    rpc_url, deployment = chain
    net = ProcessNetwork(
        rpc_url=rpc_url,
        deployment=deployment,
        state_root=tmp_path_factory.mktemp("nodes"),
        nodes=list(specs),
        model_dir=model_dir,
        extra_env=dict(extra_env or {}),
    )
    net.start()
    try:
        yield net
    finally:
        net.stop()


def node_named(network: ProcessNetwork, name: str) -> NodeProcess:
    """The running node whose spec is named ``name``."""
    return next(n for n in network.running if n.spec.name == name)


def only_model(source: RegistryDirectory, operator: str) -> DirectorySource:
    """``source`` with one model node left, ``operator``'s: a client of it can reach no other."""

    async def read() -> Directory:
        full = await source()
        return Directory(relays=full.relays, model_nodes=tuple(m for m in full.model_nodes if m.operator == operator))

    return read


async def metric(endpoint: str, series: str, *, default: float | None = 0.0) -> float:
    """The value of ``series`` (a metric name with its labels, as exposed) at ``endpoint``'s ``/metrics``;
    ``default`` when it is not exposed (None: that is an ``AssertionError``)."""
    timeout = aiohttp.ClientTimeout(total=METRICS_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(endpoint + "/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == series:
            return float(value)
    assert default is not None, f"{series} is not exposed at {endpoint}/metrics"
    return default
