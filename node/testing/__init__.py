"""Local PlanetServe networks for tests, benchmarks and demos (as ``aiohttp.test_utils`` is for aiohttp).

- :class:`LocalNetwork` / :func:`start_node`: real overlay nodes (aiohttp servers on 127.0.0.1) in this process.
- :class:`ProcessNetwork`: real ``ps-node serve`` processes, registered and staked on a chain (what ``ps-net up``
  runs).

Nothing here is mocked; it only starts, wires and stops real parts. Uses anvil's public dev keys: local use only.
"""

from node.overlay._localnet import LocalNetwork, LocalNode, serve_ephemeral, start_node
from node.testing._processes import (
    NodeProcess,
    NodeProcessFailed,
    NodeSpec,
    ProcessNetwork,
    network_specs,
)

__all__ = [
    "LocalNetwork",
    "LocalNode",
    "NodeProcess",
    "NodeProcessFailed",
    "NodeSpec",
    "ProcessNetwork",
    "network_specs",
    "serve_ephemeral",
    "start_node",
]
