"""The replay journal: a restarted node still refuses what it accepted, and the journal stays bounded and safe."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from node.overlay import OverlayConfig
from node.overlay._localnet import start_node
from node.overlay._peers import StaticPeerDirectory
from node.privacy import (
    Envelope,
    MalformedPacket,
    RejectReason,
    ReplayCache,
    ReplayJournal,
    ReplayJournalError,
    build_onion,
    split,
)

ONION = "/overlay/v1/onion"


def _tag() -> bytes:
    return secrets.token_bytes(16)


def test_a_restarted_cache_refuses_tags_it_saw_and_forgets_expired_ones(tmp_path: Path) -> None:
    clock = [1000.0]
    journal_path = tmp_path / "replay.journal"
    first = ReplayCache(capacity=10, clock=lambda: clock[0], journal=ReplayJournal(journal_path))
    fresh, stale = _tag(), _tag()
    first.check_and_add(fresh, expiry=1100)
    first.check_and_add(stale, expiry=1005)
    first.close()
    clock[0] = 1050.0  # "stale" expired more than one granularity ago
    second = ReplayCache(capacity=10, clock=lambda: clock[0], journal=ReplayJournal(journal_path))
    with pytest.raises(MalformedPacket) as info:
        second.check_and_add(fresh, expiry=1100)
    assert info.value.reason is RejectReason.REPLAY
    second.check_and_add(stale, expiry=1100)  # forgotten with its expiry: a new packet may reuse nothing of it
    assert len(second) == 2
    second.close()
    assert journal_path.stat().st_mode & 0o777 == 0o600


def test_a_record_cut_short_by_a_crash_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "replay.journal"
    cache = ReplayCache(capacity=10, clock=lambda: 1000.0, journal=ReplayJournal(path))
    kept = _tag()
    cache.check_and_add(kept, expiry=1100)
    cache.close()
    with path.open("ab") as raw:
        raw.write(b"\x00\x00\x04")  # a crash in the middle of the next record
    reopened = ReplayCache(capacity=10, clock=lambda: 1000.0, journal=ReplayJournal(path))
    with pytest.raises(MalformedPacket):
        reopened.check_and_add(kept, expiry=1100)
    reopened.close()


def test_the_journal_is_compacted_as_it_grows(tmp_path: Path) -> None:
    clock = [1000.0]
    path = tmp_path / "replay.journal"
    cache = ReplayCache(capacity=50, clock=lambda: clock[0], journal=ReplayJournal(path))
    for i in range(1000):
        clock[0] = 1000.0 + i  # each tag lives 20 s, so at most ~30 are alive at once
        cache.check_and_add(_tag(), expiry=int(clock[0]) + 20)
    cache.close()
    records = (path.stat().st_size - 8) // 20
    assert records <= 2 * 50  # never more than the live tags plus one capacity's worth of appends


def test_a_file_that_is_not_a_journal_is_refused_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "replay.journal"
    path.write_bytes(b"precious data")
    with pytest.raises(ReplayJournalError):
        ReplayCache(journal=ReplayJournal(path))
    assert path.read_bytes() == b"precious data"


async def test_a_relay_restarted_with_its_journal_refuses_a_replayed_packet(tmp_path: Path) -> None:
    secret = secrets.token_bytes(32)
    config = OverlayConfig(x25519_secret=secret, replay_journal=tmp_path / "replay.journal")
    # The model node gets one clove of two: it answers 504 after a short assembly timeout, which is fine here.
    model_config = OverlayConfig(x25519_secret=secrets.token_bytes(32), role="model", assembly_timeout_s=0.2)
    peers = StaticPeerDirectory()
    model = await start_node("model", model_config, _echo, peers=peers)
    relay = await start_node("relay", config, peers=peers)
    try:
        clove = split(Envelope(reply_key=bytes(32), body=b"x").to_bytes(), 2, 2)[0].to_bytes()
        packet = build_onion([relay.hop(), model.hop()], clove).packet
        async with aiohttp.ClientSession() as session:
            async with session.post(relay.endpoint + ONION, data=packet) as response:
                assert response.status == 502  # forwarded: the model node waited for clove 2 in vain (504 to the relay)
            await relay.stop()
            relay = await start_node("relay", config, peers=peers)
            async with session.post(relay.endpoint + ONION, data=packet) as response:
                assert response.status == 409
                assert (await response.json())["error"]["code"] == "replay"
    finally:
        await relay.stop()
        await model.stop()


async def _echo(request: bytes) -> AsyncIterator[bytes]:
    yield request
