"""The verifier's runner against what it does not control. A reorganisation under the anchor search is searched
again. A verifier concluding a node's epoch keeps the evidence record within the store's bound whatever the node sent:
an answer far over its challenge's ``max_tokens`` (a peer's bytes) and a try that failed with the same error line
thousands of times. Before, either pushed the record past ``MAX_RECORD_BYTES`` and ``EvidenceTooLarge`` (a
``VerifierError``) stopped the whole verifier: one registered node could end every verifier's run.

Real anvil and ``Attestations`` (the verifier account is not registered there, so the attestation itself fails and
is logged: this test is about the record), a real evidence store on disk; no engine runs (nothing is scored here).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, cast

import pytest

import verifier._runner
from ledger import dev_account
from tests.fixtures.attest import attestations
from tests.fixtures.chain import ChainEnv
from verifier._epoch import (
    AnchorBlock,
    AnchorMismatch,
    AuditPolicy,
    BlockSource,
    find_anchor_block,
    plan_epoch,
    sign_epoch_seed,
)
from verifier._evidence import MAX_RECORD_BYTES
from verifier._runner import MAX_FAILURES_KEPT, Verifier, VerifierConfig, _Try
from verifier._scoring import Answer, Challenge

VERIFIER = 17
NODE = dev_account(3).address


def _verifier(chain: ChainEnv, state: Path) -> Verifier:
    return Verifier(
        VerifierConfig(state_dir=state, model_dir=state, anchor_poll_s=0.05),
        account=dev_account(VERIFIER),
        attestations=attestations(chain, VERIFIER),
        nodes=cast(Any, None),
        client=cast(Any, None),
        engine=None,
        model_id="0x" + "ab" * 32,
    )


async def test_a_reorganisation_during_the_anchor_search_is_searched_again_not_the_end_of_the_verifier(
    chain: ChainEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def reorganised_once(source: BlockSource, not_before: int, *, confirmations: int = 0) -> AnchorBlock | None:
        calls.append(not_before)
        if len(calls) == 1:  # what find_anchor_block raises when a block below the head vanished mid-search
            raise AnchorMismatch(number=1, reason="the chain lost a block below its head while searched")
        return find_anchor_block(source, not_before, confirmations=0)  # anvil here mines only on transactions

    monkeypatch.setattr(verifier._runner, "find_anchor_block", reorganised_once)
    audit = _verifier(chain, tmp_path)
    begin = int(chain.w3.eth.get_block("latest")["timestamp"])
    offset = begin - time.time()
    seed = await audit._seed(1, begin, begin + 60, offset)
    assert seed is not None and len(calls) == 2 and seed.anchor.timestamp >= begin


async def test_an_oversized_answer_and_endless_failures_leave_a_bounded_record_and_the_verifier_running(
    chain: ChainEnv, tmp_path: Path
) -> None:
    account = dev_account(VERIFIER)
    handle = attestations(chain, VERIFIER)
    audit = _verifier(chain, tmp_path)
    head = chain.w3.eth.get_block("latest")
    anchor = AnchorBlock(number=int(head["number"]), hash=bytes(head["hash"]), timestamp=int(head["timestamp"]))
    epoch = 1
    seed = sign_epoch_seed(
        account, chain_id=int(chain.w3.eth.chain_id), attestations=handle.address, epoch=epoch, anchor=anchor
    )
    policy = AuditPolicy()
    plan = plan_epoch(seed.seed, epoch=epoch, epoch_start=0, epoch_length=60, nodes=[NODE], policy=policy)
    challenge = Challenge(prompt="1+1=", max_tokens=4, temperature=0.0, top_p=1.0, seed=7, stop=())
    huge = _Try(challenge=challenge, request=cast(Any, None), send_at=0.0, send_at_ms=0)
    huge.tries = 1
    huge.answer = Answer(
        text="x" * (MAX_RECORD_BYTES + 1),  # one answer alone over the bound
        token_ids=tuple(range(50_000)),
        logprobs=(-0.5,) * 50_000,
        finish_reason="length",
    )
    failing = _Try(challenge=challenge, request=cast(Any, None), send_at=0.0, send_at_ms=1)
    failing.tries = 40_000  # what retry_backoff_s allows over a long epoch against a node refusing at once
    failing.failures = ["node_overloaded"] * MAX_FAILURES_KEPT  # _send keeps no more than this
    verdict = await audit._conclude(epoch, NODE, [huge, failing], seed, plan, policy)
    assert verdict.evidence_hash and verdict.outcome == "attest_failed"  # stored; the chain refused the attestation
    (stored,) = audit.evidence.entries(epoch=epoch)
    record = audit.evidence.get(bytes.fromhex(verdict.evidence_hash[2:]))
    answer = record["challenges"][0]["answer"]
    assert len(answer["token_ids"]) == len(answer["logprobs"]) == 4 and len(answer["text"]) <= 64 * 4
    assert answer["truncated"] == {"text_chars": MAX_RECORD_BYTES + 1, "tokens": 50_000, "logprobs": 50_000}
    assert record["challenges"][1]["tries"] == 40_000 and len(record["challenges"][1]["failures"]) == 16
    assert stored.size < 64 * 1024
