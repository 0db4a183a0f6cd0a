"""The evidence store: canonical JSON named by keccak-256, re-verified on every read (a changed, replaced,
re-formatted, moved or oversized file is refused), bounded, listed by epoch and node; and a record's seed and
schedule checked against what the seed plans."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ledger import dev_account
from verifier._epoch import AnchorBlock, AuditPolicy, keccak256, plan_epoch, sign_epoch_seed
from verifier._errors import EvidenceNotFound, EvidenceTampered, EvidenceTooLarge, InvalidVerifierInput
from verifier._evidence import (
    EvidenceStore,
    canonical_json,
    check_anchor,
    check_record,
    evidence_hash,
    parse_hash,
    record_header,
)

VERIFIER = dev_account(5)
NODE = dev_account(1).address
CONTRACT = "0x" + "ab" * 20
EPOCH_START, EPOCH_LENGTH, EPOCH = 1_000, 600, 4


def _record(
    *, node: str = NODE, epoch: int = EPOCH, verifier: Any = VERIFIER, drop: int | None = None
) -> dict[str, Any]:
    """A record as the runner writes one: seed, policy, epoch bounds and one entry per planned challenge."""
    anchor = AnchorBlock(number=40, hash=keccak256(b"block 40"), timestamp=EPOCH_START + epoch * EPOCH_LENGTH + 3)
    seed = sign_epoch_seed(verifier, chain_id=31337, attestations=CONTRACT, epoch=epoch, anchor=anchor)
    policy = AuditPolicy(mean_challenges=3.0)
    plan = plan_epoch(
        seed.seed,
        epoch=epoch,
        epoch_start=EPOCH_START,
        epoch_length=EPOCH_LENGTH,
        nodes=[node],
        policy=policy,
        not_before=anchor.timestamp,
    )
    challenges = [
        {
            "send_at_ms": c.send_at_ms,
            "prompt": f"{c.index:02d}+07=",
            "max_tokens": 4,
            "temperature": 0.8,
            "seed": 2**62 + c.index,
            "answer": {"text": "12", "token_ids": [17, 18], "logprobs": [-0.25, -1e-07], "finish_reason": "stop"},
            "score": {"score": 0.97, "replay": 1.0, "max_logprob_error": None},
        }
        for c in plan.for_node(node)
    ]
    if drop is not None:
        del challenges[drop]
    record = {
        "kind": "planetserve-audit",
        "version": 1,
        "verifier": verifier.address,
        "node": node,
        "epoch": epoch,
        "score": 912_345,
        "challenges": challenges,
    }
    return record | record_header(
        seed, policy=policy, epoch_start=EPOCH_START, epoch_length=EPOCH_LENGTH, salt_commitment=keccak256(b"salt")
    )


def test_a_record_is_stored_by_the_keccak_of_its_canonical_json_and_read_back_verified(tmp_path: Path) -> None:
    store = EvidenceStore(tmp_path / "evidence")
    record = _record()
    digest = store.put(record)
    data = canonical_json(record)
    assert digest == keccak256(data) == evidence_hash(record) and len(digest) == 32
    # Canonical: keys sorted, no whitespace, exact floats; the same record in another key order is the same bytes.
    assert data == json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert canonical_json(dict(reversed(list(record.items())))) == data
    assert store.get(digest) == record == store.get("0x" + digest.hex().upper())
    assert store.raw(digest.hex()) == data
    path = store.find(digest)
    assert path == tmp_path / "evidence" / f"epoch-{EPOCH}" / f"{NODE}.{digest.hex()}.json"
    assert store.put(record) == digest and len(list(path.parent.iterdir())) == 1  # idempotent, no temp files left


def test_a_changed_replaced_reformatted_or_moved_file_is_refused(tmp_path: Path) -> None:
    store = EvidenceStore(tmp_path)
    record = _record()
    digest = store.put(record)
    path = store.find(digest)
    original = path.read_bytes()

    path.write_bytes(original.replace(b"912345", b"999999"))  # the attested score changed on disk
    with pytest.raises(EvidenceTampered, match="no longer hashes") as info:
        store.get(digest)
    assert info.value.evidence_hash == "0x" + digest.hex() and info.value.path == str(path)

    path.write_bytes(canonical_json(_record(epoch=EPOCH) | {"score": 1}))  # another valid record under this name
    with pytest.raises(EvidenceTampered, match="no longer hashes"):
        store.raw(digest)
    path.write_bytes(original)
    assert store.get(digest) == record

    # The same content pretty-printed, filed under the hash of those bytes: parses, but is not canonical.
    pretty = json.dumps(record, indent=2, sort_keys=True).encode()
    fake = path.parent / f"{NODE}.{keccak256(pretty).hex()}.json"
    fake.write_bytes(pretty)
    with pytest.raises(EvidenceTampered, match="not in canonical form"):
        store.get(keccak256(pretty))
    # A record moved to another epoch's folder: its name no longer says what it holds.
    moved = tmp_path / f"epoch-{EPOCH + 1}"
    moved.mkdir()
    path.rename(moved / path.name)
    with pytest.raises(EvidenceTampered, match="differs from its name"):
        store.get(digest)


def test_unknown_hashes_bad_hashes_and_values_json_cannot_carry_are_refused(tmp_path: Path) -> None:
    store = EvidenceStore(tmp_path)
    with pytest.raises(EvidenceNotFound) as info:
        store.get(bytes(32))
    assert info.value.evidence_hash == "0x" + "00" * 32
    for bad in ("0x1234", "zz" * 32, "0x" + "00" * 33):
        with pytest.raises(InvalidVerifierInput, match="evidence_hash"):
            parse_hash(bad)
    assert parse_hash("AB" * 32) == bytes.fromhex("ab" * 32)
    for value in (float("nan"), float("inf"), b"bytes", {1: "int key"}):
        with pytest.raises(InvalidVerifierInput):
            store.put(_record() | {"extra": value})
    with pytest.raises(InvalidVerifierInput, match=r"record\.node"):
        store.put({k: v for k, v in _record().items() if k != "node"})
    with pytest.raises(InvalidVerifierInput, match="levels deep"):
        nested: dict[str, Any] = {}
        for _ in range(40):
            nested = {"n": nested}
        store.put(_record() | {"extra": nested})
    assert store.entries() == []  # nothing refused was written


def test_each_record_is_bounded_when_written_and_when_read(tmp_path: Path) -> None:
    store = EvidenceStore(tmp_path, max_record_bytes=4096)
    with pytest.raises(EvidenceTooLarge) as info:
        store.put(_record() | {"padding": "x" * 5000})
    assert info.value.limit == 4096 and info.value.size > 4096
    digest = store.put(_record())
    path = store.find(digest)
    with path.open("ab") as grow:
        grow.write(b" " * 5000)
    with pytest.raises(EvidenceTampered, match="4096-byte bound"):
        store.get(digest)
    with pytest.raises(InvalidVerifierInput, match="max_record_bytes"):
        EvidenceStore(tmp_path, max_record_bytes=10**12)


def test_entries_list_records_by_epoch_and_node(tmp_path: Path) -> None:
    store = EvidenceStore(tmp_path)
    other = dev_account(2).address
    hashes = {(n, e): "0x" + store.put(_record(node=n, epoch=e)).hex() for n in (NODE, other) for e in (4, 5)}
    (tmp_path / "epoch-4" / "notes.txt").write_text("ignored")
    (tmp_path / "unrelated").mkdir()
    listed = store.entries()
    assert [(e.epoch, e.node, e.evidence_hash) for e in listed] == sorted(
        [(e, n, h) for (n, e), h in hashes.items()], key=lambda t: (t[0], t[1].lower())
    )
    assert [e.evidence_hash for e in store.entries(epoch=5, node=other.lower())] == [hashes[(other, 5)]]
    assert all(e.size == len(e.path.read_bytes()) for e in listed)
    assert EvidenceStore(tmp_path / "missing").entries() == []


def test_check_record_verifies_the_seed_signature_and_that_no_planned_challenge_is_missing() -> None:
    good = check_record(_record())
    assert good.signature_valid is True and good.schedule_matches is True and good.ok, good.problems
    dropped = check_record(_record(drop=0))
    assert dropped.signature_valid is True and dropped.schedule_matches is False and not dropped.ok
    record = _record()
    record["verifier"] = dev_account(6).address  # claims another verifier than the one who signed
    assert check_record(record).signature_valid is False
    forged = _record()
    forged["seed"] = forged["seed"] | {"epoch": EPOCH + 1}  # the signature is over another epoch
    assert check_record(forged).signature_valid is False
    wrong_seed = _record()
    wrong_seed["seed"] = wrong_seed["seed"] | {"seed": "0x" + "11" * 32}
    assert "not keccak256" in " ".join(check_record(wrong_seed).problems)
    bare = {k: v for k, v in _record().items() if k not in ("policy",)}
    assert check_record(bare).schedule_matches is None
    unsigned = {k: v for k, v in _record().items() if k != "seed"}
    assert check_record(unsigned) == check_record(unsigned)  # never raises
    assert check_record(unsigned).signature_valid is None and check_record(unsigned).ok


class _Blocks:
    """A chain of three blocks: 38 before the epoch, 39 starts it, 40 after (the records' anchor is 40)."""

    def __init__(self, anchor_number: int) -> None:
        start = EPOCH_START + EPOCH * EPOCH_LENGTH
        self.blocks = {
            n: AnchorBlock(
                number=n, hash=keccak256(f"block {n}".encode()), timestamp=start + 3 + 3 * (n - anchor_number)
            )
            for n in (anchor_number - 2, anchor_number - 1, anchor_number)
        }

    def latest(self) -> AnchorBlock:
        return self.blocks[max(self.blocks)]

    def block(self, number: int) -> AnchorBlock | None:
        return self.blocks.get(number)


def test_check_anchor_compares_the_records_anchor_with_the_chain() -> None:
    record = _record()
    # The record's anchor (block 40 at start + 3) has a parent at start + 0: the parent starts the epoch.
    valid, why = check_anchor(record, _Blocks(40), chain_id=31337)
    assert valid is False and "earlier block" in why
    shifted = _Blocks(40)
    shifted.blocks[39] = AnchorBlock(number=39, hash=bytes(32), timestamp=EPOCH_START + EPOCH * EPOCH_LENGTH - 1)
    assert check_anchor(record, shifted, chain_id=31337) == (True, "")
    assert check_anchor(record, shifted, chain_id=1)[0] is False
    assert check_anchor({k: v for k, v in record.items() if k != "epoch_start"}, shifted, chain_id=31337)[0] is None
