"""The verifier's runner over time: a challenge that keeps failing is retried with a doubling, capped pause and one
INFO line (repeats at DEBUG), not every 0.2 s with a line each (a ``WalletExhausted`` for a whole epoch was ~18,000
lines an hour); the epoch's anchor seeds the epoch only once ``anchor_confirmations`` blocks are mined on top of it.

Real anvil (the chain fixture, mined by hand here) and ``Attestations``; the client is a fake that always fails
(the runner's direct neighbour); no engine runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any, cast

import pytest

import verifier._sequential
from ledger import IndexedNode, Role, Wei, dev_account
from node.overlay import NoModelNode
from planetserve import ModelId
from tests.fixtures.attest import attestations, fresh_epoch
from tests.fixtures.chain import ChainEnv, rpc
from verifier._errors import InvalidVerifierInput
from verifier._prompts import SALT_BYTES, ChallengeGenerator
from verifier._runner import Verifier, VerifierConfig, _Try
from verifier._scoring import Challenge

VERIFIER = 17
NODE = dev_account(3).address


class _AlwaysFails:
    """A client whose every request fails at once, as one with an exhausted wallet does."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def complete(self, request: object, *, to: str) -> object:
        self.calls.append(time.monotonic())
        raise RuntimeError("wallet exhausted")


def _verifier(chain: ChainEnv, state: Path, client: object, **config: Any) -> Verifier:
    return Verifier(
        VerifierConfig(state_dir=state, model_dir=state, anchor_poll_s=0.05, **config),
        account=dev_account(VERIFIER),
        attestations=attestations(chain, VERIFIER),
        nodes=cast(Any, None),
        client=cast(Any, client),
        engine=None,
        model_id="0x" + "ab" * 32,
    )


async def test_a_challenge_failing_all_along_is_retried_with_capped_doubling_pauses_and_logged_once_at_info(
    chain: ChainEnv, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = _AlwaysFails()
    audit = _verifier(chain, tmp_path, client, retry_backoff_s=0.01, retry_backoff_max_s=0.08)
    drawn = ChallengeGenerator(b"\x01" * 32, b"\x02" * SALT_BYTES).challenge(b"\x03" * 32)
    challenge = Challenge(prompt="1+1=", max_tokens=4, temperature=0.0, top_p=1.0, seed=7, stop=())
    attempt = _Try(challenge=challenge, request=drawn, send_at=0.0, send_at_ms=0)
    caplog.set_level(logging.DEBUG, logger="verifier._runner")
    began = time.time()
    await audit._send(1, NODE, attempt, began + 1.0)
    assert time.time() - began < 3 and attempt.answer is None
    # A constant 0.01 s pause allows ~100 tries in 1 s; doubling to 0.08 s: 0.01 + 0.02 + 0.04 + 0.08 * k, ~15.
    assert 5 <= attempt.tries <= 20 and len(client.calls) == attempt.tries
    pauses = [b - a for a, b in zip(client.calls, client.calls[1:], strict=False)]
    assert pauses[2] > 0.035 and max(pauses) < 0.3  # it grew, and the cap held (uncapped: 0.32 s by the 7th)
    failed = [r for r in caplog.records if "failed=" in r.getMessage()]
    assert len(failed) == attempt.tries
    assert [r.levelno for r in failed] == [logging.INFO] + [logging.DEBUG] * (attempt.tries - 1)


def test_a_backoff_cap_below_the_first_pause_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidVerifierInput):
        VerifierConfig(state_dir=tmp_path, model_dir=tmp_path, retry_backoff_s=1.0, retry_backoff_max_s=0.5)
    with pytest.raises(InvalidVerifierInput):
        VerifierConfig(state_dir=tmp_path, model_dir=tmp_path, anchor_confirmations=-1)


async def test_the_epoch_is_seeded_only_once_its_anchor_has_the_configured_confirmations(
    chain: ChainEnv, tmp_path: Path
) -> None:
    assert VerifierConfig(state_dir=tmp_path, model_dir=tmp_path).anchor_confirmations >= 1  # the safe default
    audit = _verifier(chain, tmp_path, None, anchor_confirmations=2)
    head = chain.w3.eth.get_block("latest")
    begin = int(head["timestamp"]) + 10
    offset = int(head["timestamp"]) - time.time()  # chain time minus wall time
    seeding = asyncio.create_task(audit._seed(1, begin, begin + 3_600, offset))
    rpc(chain.w3, "evm_mine", [begin])  # the anchor: the first block at or after the epoch's start
    anchor_number = int(chain.w3.eth.get_block("latest")["number"])
    rpc(chain.w3, "evm_mine", [begin + 1])  # one confirmation: not enough yet
    await asyncio.sleep(0.4)
    assert not seeding.done()
    rpc(chain.w3, "evm_mine", [begin + 2])
    seed = await asyncio.wait_for(seeding, timeout=5)
    assert seed is not None and seed.anchor.number == anchor_number and seed.anchor.timestamp == begin


class _Unroutable:
    """A client that finds no route to any node (what the directory says of a node that left)."""

    async def complete(self, request: object, *, to: str) -> object:
        raise NoModelNode("0x" + "ab" * 32)


def _model_node(index: int, *, status: str = "active") -> IndexedNode:
    return IndexedNode(
        operator=dev_account(index).address,
        role=Role.MODEL,
        endpoint=f"http://127.0.0.1:{9000 + index}",
        x25519_public_key=bytes(32),
        model_id=ModelId("0x" + "ab" * 32),
        price_per_1k_tokens=Wei(1),
        stake=Wei(10**18),
        status=status,
        active=status == "active",
        unbonding_ends_at=0,
    )


async def test_deregistered_nodes_are_forgotten_and_a_node_the_state_refuses_does_not_stop_the_epoch(
    chain: ChainEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two tracked nodes at most (MAX_NODES is 100,000): one still registered, one deregistered since.
    monkeypatch.setattr(verifier._sequential, "MAX_NODES", 2)
    kept, left, new_a, new_b = (dev_account(i).address for i in (4, 5, 6, 7))
    view = [_model_node(4), _model_node(5, status="deregistered"), _model_node(6), _model_node(7)]

    async def nodes() -> list[IndexedNode]:
        return view

    audit = Verifier(
        VerifierConfig(state_dir=tmp_path, model_dir=tmp_path, anchor_poll_s=0.05, anchor_confirmations=0),
        account=dev_account(VERIFIER),
        attestations=attestations(chain, VERIFIER),
        nodes=nodes,
        client=cast(Any, _Unroutable()),
        engine=None,
        model_id="0x" + "ab" * 32,
    )
    for node in (kept, left):
        audit.sequential.observe(node, [0.9])
        audit.node_state(node).last_epoch = 0
    att = attestations(chain)
    epoch = fresh_epoch(chain, att)
    chain.advance(att.epoch_length())  # the whole epoch is past: every challenge is sent (and refused) at once
    report = await asyncio.wait_for(audit.run_epoch(epoch), timeout=60)
    outcomes = {v.node: v.outcome for v in report.verdicts}
    # The deregistered node is gone; one new node fits in its place; the other is refused by the bound, logged,
    # and its verdict says so, while the epoch (and the loop) goes on. Before: the first refusal ended run().
    assert left not in audit.sequential.nodes and left not in audit._state
    assert set(audit.sequential.nodes) == {kept, new_a} or set(audit.sequential.nodes) == {kept, new_b}
    assert sorted(outcomes.values()) == ["abstained", "abstained", "failed"]
    assert outcomes[kept] == "abstained"
    state = json.loads((tmp_path / "state.json").read_text())
    assert left not in state["nodes"] and kept in state["nodes"]
