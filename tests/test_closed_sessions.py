"""A closed client transport or re-forwarder opens no new connection.

Both create their ``aiohttp.ClientSession`` lazily. Before, a request started after ``close()`` (a background task
its owner had not stopped first) silently opened a fresh session that nothing closed any more; the garbage collector
then reported it as a ``ResourceWarning`` during whichever test happened to be running (a CI run failed that way).
Now the transport raises :class:`SessionClosed` and the re-forwarder serves locally, and neither dials anything; a
closed registry directory (its index's database) likewise refuses reads rather than opening the index again.
Real aiohttp servers on 127.0.0.1 count what is dialled.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from eth_account import Account

from node.client import Client, ClientConfig
from node.client._client import OverlayTransport
from node.client._registry import RegistryDirectory
from node.overlay import CompletionRequest, Directory, ModelNode, SessionClosed
from node.overlay._heartbeat import HEARTBEAT_PATH
from node.overlay._reforward import ReforwardConfig, Reforwarder
from node.privacy import RelayDescriptor
from node.testing import serve_ephemeral
from planetserve import ModelId
from tests.fixtures.chain import ChainEnv

MODEL = ModelId.of("ps-closed@1")


@pytest.fixture
async def counted() -> AsyncIterator[tuple[str, list[str]]]:
    """A server that answers every path 503 and remembers each request's path."""
    hits: list[str] = []

    async def any_path(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(status=503)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", any_path)
    runner, endpoint = await serve_ephemeral(app)
    try:
        yield endpoint, hits
    finally:
        await runner.cleanup()


def _node(endpoint: str) -> ModelNode:
    return ModelNode(
        operator=Account.create().address,
        endpoint=endpoint,
        public_key=secrets.token_bytes(32),
        model_id=MODEL,
        price_per_1k_tokens=0,
    )


async def test_a_closed_transport_raises_and_dials_nothing(counted: tuple[str, list[str]]) -> None:
    endpoint, hits = counted
    transport = OverlayTransport()
    with pytest.raises(OSError):  # open: it dials (and the server refuses)
        await transport.fetch_heartbeat(endpoint)
    assert hits == [HEARTBEAT_PATH]
    await transport.close()
    with pytest.raises(SessionClosed, match="closed"):
        await transport.fetch_heartbeat(endpoint)
    assert hits == [HEARTBEAT_PATH]


async def test_a_closed_client_refuses_a_request_in_one_error(counted: tuple[str, list[str]]) -> None:
    endpoint, hits = counted
    relays = []
    for _ in range(4):
        address = Account.create().address
        relays.append(RelayDescriptor(node_id=address, operator=address, endpoint=endpoint, public_key=bytes(32)))
    directory = Directory(relays=tuple(relays), model_nodes=(_node(endpoint),))
    client = Client(directory, ClientConfig(hops=1, heartbeats=False))
    await client.close()
    request = CompletionRequest(model=MODEL, prompt="1+1=", max_tokens=2, temperature=0.0)
    with pytest.raises(SessionClosed):
        await client.complete(request)
    assert hits == []


async def test_a_closed_reforwarder_chooses_no_peer_and_dials_nothing(counted: tuple[str, list[str]]) -> None:
    endpoint, hits = counted
    peer = _node(endpoint)

    async def directory() -> Directory:
        return Directory(relays=(), model_nodes=(peer,))

    reforwarder = Reforwarder(ReforwardConfig(operator=Account.create().address, heartbeat_refresh_s=0.0), directory)
    chosen, _ = await reforwarder._choose(MODEL)  # open: it fetches the peer's heartbeat (refused: not chosen)
    assert chosen is None and hits == [HEARTBEAT_PATH]
    await reforwarder.close()
    chosen, _ = await reforwarder._choose(MODEL)
    assert chosen is None and hits == [HEARTBEAT_PATH]
    with pytest.raises(SessionClosed):
        reforwarder._client_session()


async def test_a_closed_registry_directory_refuses_reads_instead_of_reopening_its_index(
    chain: ChainEnv, tmp_path: Path
) -> None:
    db = tmp_path / "index.sqlite"
    directory = RegistryDirectory(chain.rpc_url, deployment=chain.deployment_path, db_url=f"sqlite:///{db}")
    await directory()  # opens the index (its file) and reads the registry
    assert db.exists()
    directory.close()
    db.unlink()  # nothing holds it any more
    with pytest.raises(SessionClosed):
        await directory()
    assert not db.exists()  # not reopened
    directory.close()  # idempotent
