"""Onion keys rotate: the store's three-step rotation, a running relay that follows it without a restart (old key
accepted during the grace period, refused and its file gone after it), and ``ps-node keys rotate`` on a real anvil."""

from __future__ import annotations

import asyncio
import json
import secrets
import stat
from pathlib import Path

import aiohttp
import pytest

from node import IdentityError, OnionKeyStore, RotationInProgress
from node._identity import MIN_GRACE_S, PENDING_KEY_FILE, PREVIOUS_KEY_FILE, PREVIOUS_META_FILE
from node.overlay import OverlayConfig, keys
from node.overlay._localnet import LocalNode, start_node
from node.privacy import Hop, build_onion, key_id, public_key
from node.privacy._constants import EXPIRY_GRANULARITY, MAX_TTL
from tests._cli import REGISTER, cli_env, ok_json
from tests._procs import run_cli
from tests.fixtures.chain import ChainEnv

ONION = "/overlay/v1/onion"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_minimum_grace_covers_a_packet_lifetime_and_the_directory_lag() -> None:
    assert MIN_GRACE_S >= MAX_TTL + EXPIRY_GRANULARITY + 60
    with pytest.raises(IdentityError):
        OnionKeyStore(Path("unused"), grace_s=MAX_TTL)


def test_a_rotation_keeps_the_old_key_for_the_grace_period_then_shreds_it(tmp_path: Path) -> None:
    clock = Clock()
    store = OnionKeyStore(tmp_path / "state", grace_s=MIN_GRACE_S, clock=clock)
    old = store.current()
    new = store.begin_rotation()
    assert store.begin_rotation() == new  # an interrupted rotation resumes with the same key
    assert _mode(tmp_path / "state" / PENDING_KEY_FILE) == 0o600
    assert {i.public_key for i in store.identities()} == {old.public_key, new.public_key}
    assert store.commit_rotation() == new and store.current() == new
    previous = store.previous()
    assert previous is not None and previous[0] == old and previous[1] == clock.now + MIN_GRACE_S
    assert _mode(tmp_path / "state" / PREVIOUS_KEY_FILE) == 0o600
    with pytest.raises(RotationInProgress):
        store.begin_rotation()  # the old key is still in use by packets in flight
    clock.now += MIN_GRACE_S - 1
    assert not store.prune() and (tmp_path / "state" / PREVIOUS_KEY_FILE).exists()
    clock.now += 2
    assert store.prune()
    assert not (tmp_path / "state" / PREVIOUS_KEY_FILE).exists()
    assert not (tmp_path / "state" / PREVIOUS_META_FILE).exists()
    assert [i.public_key for i in store.identities()] == [new.public_key]


def test_an_aborted_rotation_shreds_the_pending_key(tmp_path: Path) -> None:
    store = OnionKeyStore(tmp_path)
    old = store.current()
    store.begin_rotation()
    assert store.abort_rotation()
    assert not (tmp_path / PENDING_KEY_FILE).exists() and store.current() == old and store.pending() is None


async def _peels(session: aiohttp.ClientSession, relay: LocalNode, node_public: bytes) -> str:
    """POST a packet addressed to ``node_public`` at ``relay``: the error code it gets (``unknown_next_hop`` means
    it was peeled: the next hop is no registered node; ``unknown_key`` means the relay no longer holds that key)."""
    path = [
        Hop(node_id=relay.node_id, public_key=node_public),
        Hop(node_id=secrets.token_bytes(20), public_key=public_key(secrets.token_bytes(32))),
    ]
    async with session.post(relay.endpoint + ONION, data=build_onion(path, b"clove").packet) as response:
        code: str = (await response.json())["error"]["code"]
    return code


async def test_a_running_relay_follows_a_rotation_and_refuses_the_old_key_after_the_grace(tmp_path: Path) -> None:
    clock = Clock()
    store = OnionKeyStore(tmp_path, grace_s=MIN_GRACE_S, clock=clock)
    old = store.current()
    ring = store.keyring()
    config = OverlayConfig(x25519_secret=old.private_key, onion_keyring=ring, keyring_reload_s=0.05)
    relay = await start_node("relay", config)
    try:
        async with aiohttp.ClientSession() as session:
            assert await _peels(session, relay, old.public_key) == "unknown_next_hop"
            new = store.begin_rotation()
            await asyncio.sleep(0.2)  # the node reloads its keyring on its own
            assert key_id(new.public_key) in relay.overlay[keys.ONION_KEYRING]
            assert await _peels(session, relay, new.public_key) == "unknown_next_hop"  # before it is even published
            store.commit_rotation()
            await asyncio.sleep(0.2)
            assert await _peels(session, relay, old.public_key) == "unknown_next_hop"  # grace period
            clock.now += MIN_GRACE_S + 1
            await asyncio.sleep(0.2)  # the node's reload prunes the old key: overwritten and unlinked
            assert not (tmp_path / PREVIOUS_KEY_FILE).exists()
            assert await _peels(session, relay, old.public_key) == "unknown_key"
            assert await _peels(session, relay, new.public_key) == "unknown_next_hop"
    finally:
        await relay.stop()


def test_ps_node_keys_rotate_publishes_the_new_key_on_chain(chain: ChainEnv, tmp_path: Path) -> None:
    env = cli_env(chain, tmp_path)
    registered = ok_json(run_cli("node", [*REGISTER, "--price", "1000", "--stake", "1", "--json"], env))
    rotated = ok_json(
        run_cli("node", ["keys", "rotate", "--publish-after", "0", "--grace", str(MIN_GRACE_S), "--json"], env)
    )
    assert rotated["previous_public_key"] == registered["x25519_public_key"]
    assert rotated["current_public_key"] != registered["x25519_public_key"] and rotated["pending_public_key"] is None
    assert rotated["events"] == ["NodeUpdated"]  # the operator-signed registry update published it
    status = ok_json(run_cli("node", ["status", "--json"], env))
    assert status["x25519_public_key"] == rotated["current_public_key"]
    shown = ok_json(run_cli("node", ["keys", "show", "--json"], env))
    assert shown == {k: rotated[k] for k in shown}
    # A second rotation inside the grace period is refused with one line and a named exit code, nothing changed.
    again = run_cli("node", ["keys", "rotate", "--publish-after", "0", "--json"], env)
    assert again.returncode != 0 and "grace period" in again.stderr
    assert json.loads(run_cli("node", ["keys", "show", "--json"], env).stdout) == shown


def test_a_served_node_takes_a_rotation_without_a_restart(chain: ChainEnv, tmp_path: Path) -> None:
    from tests._cli import serve_ready, spawn_serve

    env = cli_env(chain, tmp_path)
    proc = spawn_serve(["serve", "--role", "relay", "--port", "0", "--json"], env)
    try:
        endpoint = serve_ready(proc)["endpoint"]
        register = ["register", "--role", "relay", "--endpoint", endpoint, "--price", "10", "--stake", "1", "--json"]
        registered = ok_json(run_cli("node", register, env))  # its endpoint check reads the served key
        rotated = ok_json(run_cli("node", ["keys", "rotate", "--publish-after", "3", "--json"], env))

        async def served_keys() -> list[str]:
            async with aiohttp.ClientSession() as session, session.get(endpoint + "/overlay/info") as response:
                keys_: list[str] = (await response.json())["x25519_public_keys"]
            return keys_

        served = asyncio.run(served_keys())
        # The running node holds the new key (loaded while the CLI waited to publish) and, in grace, the old one.
        assert set(served) == {rotated["current_public_key"], registered["x25519_public_key"]}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
