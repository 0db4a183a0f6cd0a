"""A packet, a next hop or a first hop cannot make a relay or a client connect anywhere but a registered node.

An "internal service" is a listening socket on 127.0.0.1 that counts the connections it accepts: what a relay must
never reach on a sender's say-so (an admin port, a metadata service). Each test says why it would have failed at
commit 18501c1 (onion v1, before next hops became registry ids).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from ledger import Role
from node.overlay import ClientSettings, ReplyIncomplete, send_request
from node.overlay._localnet import LocalNetwork, serve_ephemeral
from node.overlay._peers import Peer
from node.overlay._relay import ONION_PATH
from node.overlay._serve import registry_peer_directory
from node.privacy import Hop, OnionKey, build_onion
from tests.fixtures.chain import OWNER, SLASHER, TEST_PARAMS, ChainEnv
from tests.independent import onion as ind

ETH = 10**18


async def _nothing(_request: bytes) -> AsyncIterator[bytes]:
    yield b"never"


@dataclass
class InternalService:
    """A plain TCP listener that counts accepted connections and closes each at once."""

    accepted: int = 0
    server: asyncio.Server | None = None
    port: int = 0

    async def __aenter__(self) -> InternalService:
        async def on_connection(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.accepted += 1
            writer.close()

        self.server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Redirector:
    """A registered node whose every answer is a redirect to ``target`` (a malicious next hop or first hop)."""

    target: str
    status: int
    hits: int = 0
    key: OnionKey = field(default_factory=lambda: OnionKey(secrets.token_bytes(32)))
    node_id: bytes = field(default_factory=lambda: secrets.token_bytes(20))

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.hits += 1
        return web.Response(status=self.status, headers={"Location": self.target + ONION_PATH})

    def peer(self, endpoint: str) -> Peer:
        return Peer(node_id=self.node_id, endpoint=endpoint, public_key=self.key.public)


async def _serve(redirector: Redirector) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post(ONION_PATH, redirector.handle)
    return await serve_ephemeral(app)


@pytest.mark.parametrize("status", [302, 307])
async def test_a_relay_does_not_follow_a_next_hops_redirect_to_an_internal_url(status: int) -> None:
    # At 18501c1 the relay posted with aiohttp's default allow_redirects=True: a 302 became a GET to the internal URL
    # and a 307 re-posted the packet there, so the internal service would have accepted connections.
    async with (
        InternalService() as internal,
        LocalNetwork(relays=1, handler=_nothing) as net,
        aiohttp.ClientSession() as session,
    ):
        redirector = Redirector(target=internal.url, status=status)
        runner, endpoint = await _serve(redirector)
        try:
            net.peers.add(redirector.peer(endpoint))
            relay = net.descriptors()[0]
            settings = ClientSettings(n=2, k=2)
            with pytest.raises(ReplyIncomplete) as caught:
                async for _ in send_request(session, b"x", [[relay], [relay]], redirector.peer(endpoint), settings):
                    pass
        finally:
            await runner.cleanup()
        assert redirector.hits == 2
        assert caught.value.started == ()
        assert internal.accepted == 0


@pytest.mark.parametrize("status", [302, 307])
async def test_a_client_does_not_follow_a_first_hops_redirect(status: int) -> None:
    # At 18501c1 the client, too, posted with allow_redirects=True.
    async with InternalService() as internal, aiohttp.ClientSession() as session:
        redirector = Redirector(target=internal.url, status=status)
        runner, endpoint = await _serve(redirector)
        try:
            settings = ClientSettings(n=2, k=2)
            with pytest.raises(ReplyIncomplete):
                async for _ in send_request(session, b"x", [[], []], redirector.peer(endpoint), settings):
                    pass
        finally:
            await runner.cleanup()
        assert redirector.hits == 2
        assert internal.accepted == 0


async def _post(session: aiohttp.ClientSession, endpoint: str, packet: bytes) -> tuple[int, str]:
    async with session.post(endpoint + ONION_PATH, data=packet, allow_redirects=False) as response:
        body = await response.json()
        return response.status, str(body["error"]["code"])


async def test_a_packet_naming_an_unregistered_id_makes_the_relay_dial_nothing() -> None:
    # At 18501c1 the slot held the next hop's URL and the relay dialled whatever it said (see the v1-style test
    # below); an id has no address until the relay's own directory gives it one.
    async with (
        InternalService() as internal,
        LocalNetwork(relays=1, handler=_nothing) as net,
        aiohttp.ClientSession() as session,
    ):
        relay = net.relay_nodes[0]
        stranger = Hop(node_id=secrets.token_bytes(20), public_key=OnionKey(secrets.token_bytes(32)).public)
        packet = build_onion([relay.hop(), stranger], b"clove").packet
        assert await _post(session, relay.endpoint, packet) == (400, "unknown_next_hop")
        assert internal.accepted == 0
        # The control: once the id is registered (here, at the internal service's address) the relay does dial it,
        # so the count above is zero because of the refusal, not because the listener cannot be reached.
        net.peers.add(Peer(node_id=stranger.node_id, endpoint=internal.url, public_key=stranger.public_key))
        status, _code = await _post(session, relay.endpoint, build_onion([relay.hop(), stranger], b"clove").packet)
        assert status == 502
        assert internal.accepted >= 1


async def test_a_hand_made_v1_style_url_slot_makes_the_relay_dial_nothing() -> None:
    # The slot layout of version 1 (§5.2 of 18501c1): hop_type, expiry, addr_len, a 64-byte ASCII URL, next_eph_pub,
    # next_tag, zeros, here naming the internal service, under valid v2 MACs. Version 1 relays dialled that URL.
    async with (
        InternalService() as internal,
        LocalNetwork(relays=1, handler=_nothing) as net,
        aiohttp.ClientSession() as session,
    ):
        relay = net.relay_nodes[0]
        expiry = (int(time.time()) + 60).to_bytes(4, "big")
        url = internal.url.encode()
        v1_slot = b"\x01" + expiry + bytes([len(url)]) + url.ljust(64, b"\0") + secrets.token_bytes(48) + bytes(10)
        assert len(v1_slot) == 128
        target = OnionKey(secrets.token_bytes(32))
        built = ind.build(
            [(relay.node_id, relay.public_key), (secrets.token_bytes(20), target.public)],
            b"clove",
            now=time.time(),
            ttl=60,
            ephemeral_secrets=[secrets.token_bytes(32) for _ in range(2)],
            randbytes=secrets.token_bytes,
            raw_slots={0: v1_slot},
        )
        status, code = await _post(session, relay.endpoint, built.packet)
        assert status == 400 and code in ("bad_slot", "unknown_next_hop")
        assert internal.accepted == 0


def _register_relay(chain: ChainEnv, index: int, endpoint: str, key: OnionKey) -> None:
    chain.registry(index).register(
        role=Role.RELAY,
        endpoint=endpoint,
        x25519_public_key=key.public,
        model_id=None,
        price_per_1k_tokens=0,
        stake=ETH // 10,
    )


def _id(chain: ChainEnv, index: int) -> bytes:
    return bytes.fromhex(chain.account(index).address.removeprefix("0x"))


async def test_registry_peer_directory_follows_the_real_registry(chain: ChainEnv, tmp_path: Path) -> None:
    # RegistryPeerDirectory did not exist at 18501c1 (relays dialled the URL in the slot): this fails on import there.
    keys = {i: OnionKey(secrets.token_bytes(32)) for i in (2, 3, 4)}
    for i in (2, 3):
        _register_relay(chain, i, f"http://127.0.0.1:{9000 + i}", keys[i])
    directory = registry_peer_directory(
        chain.rpc_url, chain.deployment_path, f"sqlite:///{tmp_path / 'index.sqlite'}", refresh_interval_s=3600
    )
    try:
        peer = await directory.resolve(_id(chain, 2))
        assert peer is not None
        assert (peer.endpoint, peer.public_key) == ("http://127.0.0.1:9002", keys[2].public)
        assert directory.refreshes == 1
        # A miss refreshes at most once per min_refresh_interval_s (2 s): unknown ids cannot hammer the RPC node.
        assert await directory.resolve(_id(chain, 4)) is None
        assert await directory.resolve(secrets.token_bytes(20)) is None
        assert directory.refreshes == 1
        # Registered a moment ago: found on the first miss once the interval has passed.
        _register_relay(chain, 4, "http://127.0.0.1:9004", keys[4])
        assert await directory.resolve(_id(chain, 4)) is None  # still inside the interval
        await asyncio.sleep(2.1)
        assert await directory.resolve(_id(chain, 4)) is not None
        assert directory.refreshes == 2
        # Jailed (slashed) and deregistered nodes drop out of the view at the next refresh.
        chain.registry(OWNER).grant_slasher(chain.account(SLASHER).address)
        chain.registry(SLASHER).slash(chain.account(2).address, 1, b"\x01" * 32)
        chain.registry(3).request_unbond()
        chain.advance(TEST_PARAMS.unbonding_delay)
        chain.registry(3).deregister()
        assert await directory.refresh()
        assert await directory.resolve(_id(chain, 2)) is None
        assert await directory.resolve(_id(chain, 3)) is None
        assert await directory.resolve(_id(chain, 4)) is not None
    finally:
        directory.close()
