"""Signed heartbeats and the privacy-preserving cache summary (``node/overlay/_heartbeat.py``)."""

from __future__ import annotations

import json
import time

import pytest
from eth_account import Account
from pydantic import ValidationError

from node.inference import EngineStats
from node.inference._prefix import chunk_hashes
from node.overlay._heartbeat import (
    MAX_SUMMARY_BYTES,
    CacheSummaryBuilder,
    Heartbeat,
    HeartbeatCheck,
    HeartbeatPublisher,
    HeartbeatRejected,
    SignedHeartbeat,
    sign_heartbeat,
)

MODEL = "0x" + "ab" * 32
OPERATOR = Account.create()
OTHER = Account.create()


def _heartbeat(seq: int = 1, issued_at: float | None = None, **fields: object) -> Heartbeat:
    now = time.time() if issued_at is None else issued_at
    base: dict[str, object] = {
        "node": OPERATOR.address,
        "model": MODEL,
        "seq": seq,
        "issued_at_ms": int(now * 1000),
        "queued_requests": 1,
        "running_requests": 2,
        "queued_tokens": 300,
        "ttft_ms_p50": 12.5,
    }
    base.update(fields)
    return Heartbeat.model_validate(base)


def _check() -> HeartbeatCheck:
    return HeartbeatCheck(operator=OPERATOR.address, model_id=MODEL)


def test_a_heartbeat_signed_by_the_registered_operator_is_accepted_and_sequence_only_moves_forward() -> None:
    check = _check()
    assert check.accept(sign_heartbeat(_heartbeat(seq=5), OPERATOR)).queued_tokens == 300
    with pytest.raises(HeartbeatRejected, match="not newer"):
        check.accept(sign_heartbeat(_heartbeat(seq=5), OPERATOR))
    with pytest.raises(HeartbeatRejected, match="not newer"):
        check.accept(sign_heartbeat(_heartbeat(seq=4), OPERATOR))
    assert check.accept(sign_heartbeat(_heartbeat(seq=6), OPERATOR)).seq == 6


def test_forged_tampered_stale_and_future_heartbeats_are_rejected() -> None:
    with pytest.raises(HeartbeatRejected, match="not signed by the node's operator"):
        _check().accept(sign_heartbeat(_heartbeat(), OTHER))
    honest = sign_heartbeat(_heartbeat(queued_tokens=9000), OPERATOR)
    # A relay or anyone in between rewrites the load figure: the signature no longer recovers to the operator.
    tampered = SignedHeartbeat(heartbeat=_heartbeat(queued_tokens=0), signature=honest.signature)
    with pytest.raises(HeartbeatRejected, match="not signed"):
        _check().accept(tampered)
    with pytest.raises(HeartbeatRejected, match="stale"):
        _check().accept(sign_heartbeat(_heartbeat(issued_at=time.time() - 60), OPERATOR))
    with pytest.raises(HeartbeatRejected, match="future"):
        _check().accept(sign_heartbeat(_heartbeat(issued_at=time.time() + 60), OPERATOR))
    with pytest.raises(HeartbeatRejected, match="another node"):
        _check().accept(sign_heartbeat(_heartbeat(node=OTHER.address), OTHER))
    with pytest.raises(HeartbeatRejected, match="another model"):
        _check().accept(sign_heartbeat(_heartbeat(model="0x" + "cd" * 32), OPERATOR))
    garbage = SignedHeartbeat(heartbeat=_heartbeat(), signature="0x" + "00" * 65)
    with pytest.raises(HeartbeatRejected, match="signature"):
        _check().accept(garbage)


def _prompt(doc: int, length: int, suffix: int) -> list[bytes]:
    tokens = [(doc * 7919 + i) % 300 for i in range(length)] + [(suffix * 31 + i) % 300 for i in range(32)]
    return chunk_hashes(tokens)


def test_only_prefixes_seen_in_k_distinct_requests_and_still_cached_are_advertised() -> None:
    builder = CacheSummaryBuilder(k_distinct=3)
    shared = [_prompt(1, 160, s) for s in range(3)]  # three requests sharing a 160-token document
    private = _prompt(2, 160, 99)  # one user's prompt, seen once
    for hashes in [*shared, private]:
        builder.observe(hashes)
    cached = [h for hashes in [*shared, private] for h in hashes]
    summary = builder.build(cached)
    # The shared document's 10 chunks are matched by a new request with another suffix; the private prompt is not.
    assert summary.matched_chunks(_prompt(1, 160, 1234)) == 10
    assert summary.matched_chunks(private) == 0
    # A guess of the private prompt cannot be confirmed from the summary either.
    assert not any(summary.contains(h) for h in private)
    # Seen often but evicted: not advertised (the summary says what the node holds).
    assert builder.build(cached=[]).matched_chunks(shared[0]) == 0
    # The same request repeated counts once.
    again = CacheSummaryBuilder(k_distinct=2)
    again.observe(private + private)
    assert again.build(private).matched_chunks(private) == 0


def test_the_salt_changes_per_epoch_so_summaries_of_two_epochs_do_not_share_bits() -> None:
    builder = CacheSummaryBuilder(k_distinct=1, epoch_s=100)
    hashes = _prompt(3, 320, 0)
    builder.observe(hashes)
    first = builder.build(hashes, now=1_000)
    second = builder.build(hashes, now=1_150)
    assert first.epoch != second.epoch and first.salt != second.salt and first.bits != second.bits
    assert first.matched_chunks(hashes) == second.matched_chunks(hashes) == len(hashes)


def test_memory_and_summary_size_are_bounded_whatever_the_traffic() -> None:
    builder = CacheSummaryBuilder(k_distinct=1, tracked=1000, max_entries=4096)
    for doc in range(200):
        builder.observe(_prompt(doc, 160, doc))
    assert len(builder._counts) <= 1000
    all_hashes = [h for doc in range(200) for h in _prompt(doc, 160, doc)]
    summary = builder.build(all_hashes * 3)
    assert summary.entries <= 4096
    assert len(summary.bits) * 3 // 4 <= MAX_SUMMARY_BYTES
    with pytest.raises(ValueError):
        CacheSummaryBuilder(max_entries=10**6)


def _stats(queued_tokens: int, cached: tuple[bytes, ...]) -> EngineStats:
    return EngineStats(
        model_id=MODEL,
        queued_requests=0,
        running_requests=1,
        queued_tokens=queued_tokens,
        cached_prefix_hashes=cached,
        cache_bytes=0,
        prefill_tokens_computed=0,
        prefill_tokens_cached=0,
        tokens_per_second=0.0,
    )


def test_the_publisher_reissues_at_most_once_per_interval_with_increasing_seq() -> None:
    load = {"tokens": 10}
    publisher = HeartbeatPublisher(
        account=OPERATOR, model_id=MODEL, stats=lambda: _stats(load["tokens"], ()), interval_s=0.5
    )
    publisher.state.record_ttft(0.020)
    first = publisher.current(now=1000.0)
    load["tokens"] = 99
    assert publisher.current(now=1000.2) is first
    second = publisher.current(now=1000.6)
    assert second.heartbeat.seq == first.heartbeat.seq + 1 and second.heartbeat.queued_tokens == 99
    assert second.heartbeat.ttft_ms_p50 == pytest.approx(20.0)
    check = HeartbeatCheck(operator=OPERATOR.address, model_id=MODEL, max_age_s=10**10)
    assert check.accept(first, now=1000.0).seq == 1 and check.accept(second, now=1000.6).seq == 2


def test_a_version_3_heartbeat_signs_its_backlog_and_speeds_and_the_publisher_reports_the_engine_figures() -> None:
    stats = EngineStats(
        model_id=MODEL,
        queued_requests=1,
        running_requests=3,
        queued_tokens=40,
        cached_prefix_hashes=(),
        cache_bytes=0,
        prefill_tokens_computed=0,
        prefill_tokens_cached=0,
        tokens_per_second=0.0,
        decode_backlog_tokens=700,
        seconds_per_decode_token=0.0025,
        seconds_per_prefill_token=5e-5,
    )
    signed = HeartbeatPublisher(account=OPERATOR, model_id=MODEL, stats=lambda: stats).current()
    beat = _check().accept(SignedHeartbeat.model_validate_json(signed.model_dump_json()))
    assert (beat.v, beat.decode_backlog_tokens) == (3, 700)
    assert beat.decode_ms_per_token == pytest.approx(2.5)
    assert beat.prefill_ms_per_token == pytest.approx(0.05)
    # The new fields are signed: a node's backlog or speed cannot be changed on the way.
    for field, value in (("decode_backlog_tokens", 0), ("prefill_ms_per_token", 0.001)):
        tampered = signed.model_copy(update={"heartbeat": signed.heartbeat.model_copy(update={field: value})})
        with pytest.raises(HeartbeatRejected, match="not signed by the node's operator"):
            _check().accept(tampered)


def test_a_version_2_heartbeat_still_verifies_with_an_unknown_prefill_speed_and_one_carrying_it_is_refused() -> None:
    from eth_account.messages import encode_defunct

    # What a version-2 node signed and served: the version-1 and -2 fields, no prefill speed.
    v2 = {
        "v": 2,
        "node": OPERATOR.address,
        "model": MODEL,
        "seq": 3,
        "issued_at_ms": int(time.time() * 1000),
        "queued_requests": 0,
        "running_requests": 1,
        "queued_tokens": 10,
        "ttft_ms_p50": 4.0,
        "summary": None,
        "decode_backlog_tokens": 40,
        "decode_ms_per_token": 2.5,
    }
    body = json.dumps(v2, separators=(",", ":")).encode()
    signature = OPERATOR.sign_message(encode_defunct(b"planetserve/v1/heartbeat\n" + body)).signature
    raw = json.dumps({"heartbeat": v2, "signature": "0x" + bytes(signature).hex()})
    beat = _check().accept(SignedHeartbeat.model_validate_json(raw))
    assert (beat.v, beat.decode_backlog_tokens, beat.prefill_ms_per_token) == (2, 40, 0.0)
    with pytest.raises(ValueError, match="version-2 heartbeat carries no prefill speed"):
        SignedHeartbeat.model_validate_json(
            json.dumps({"heartbeat": {**v2, "prefill_ms_per_token": 0.05}, "signature": "0x" + "00" * 65})
        )


def test_a_version_1_heartbeat_still_verifies_with_an_unknown_backlog_and_one_carrying_v2_fields_is_refused() -> None:
    from eth_account.messages import encode_defunct

    # What a node before version 2 signed and served: exactly the version-1 fields, nothing else.
    v1 = {
        "v": 1,
        "node": OPERATOR.address,
        "model": MODEL,
        "seq": 3,
        "issued_at_ms": int(time.time() * 1000),
        "queued_requests": 0,
        "running_requests": 1,
        "queued_tokens": 10,
        "ttft_ms_p50": 4.0,
        "summary": None,
    }
    body = json.dumps(v1, separators=(",", ":")).encode()
    signature = OPERATOR.sign_message(encode_defunct(b"planetserve/v1/heartbeat\n" + body)).signature
    raw = json.dumps({"heartbeat": v1, "signature": "0x" + bytes(signature).hex()})
    beat = _check().accept(SignedHeartbeat.model_validate_json(raw))
    assert (beat.v, beat.decode_backlog_tokens, beat.decode_ms_per_token) == (1, 0, 0.0)
    with pytest.raises(ValueError, match="version-1 heartbeat carries no decode backlog"):
        SignedHeartbeat.model_validate_json(
            json.dumps({"heartbeat": {**v1, "decode_backlog_tokens": 5}, "signature": "0x" + "00" * 65})
        )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("queued_tokens", 10**400),  # readers multiply it by a float: OverflowError in every client's choice
        ("queued_requests", 2**53 + 1),
        ("seq", 2**64),
        ("issued_at_ms", 10**30),  # divided by 1000 in the age check
        ("decode_backlog_tokens", 2**64),
        ("ttft_ms_p50", 1e308),
        ("decode_ms_per_token", float("inf")),
        ("prefill_ms_per_token", float("inf")),
        ("prefill_ms_per_token", 1e10),
    ],
)
def test_a_heartbeat_carrying_a_number_past_what_readers_compute_with_is_refused(field: str, value: object) -> None:
    body = json.loads(sign_heartbeat(_heartbeat(), OPERATOR).model_dump_json())
    body["heartbeat"][field] = value
    with pytest.raises(ValidationError):
        SignedHeartbeat.model_validate_json(json.dumps(body))
    body["heartbeat"][field] = 2**53 if isinstance(value, int) else 1e9  # the largest accepted
    assert (
        SignedHeartbeat.model_validate_json(json.dumps(body)).heartbeat.model_dump()[field] == body["heartbeat"][field]
    )
