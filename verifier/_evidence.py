"""The evidence store: each attested epoch's evidence for one node, as canonical JSON named by its keccak-256.

Why content addressing: the attestation on chain carries only ``evidenceHash``; whoever holds the bytes can prove
they are what was attested (``keccak256(bytes) == evidenceHash``), and nobody can change a stored record without
changing its name. So every read re-hashes the file and refuses one that no longer matches (:class:`EvidenceTampered`):
a record is trusted for what it hashes to, never for where it was found.

**A record** is one JSON object: one node's audits in one epoch (its challenges, the node's answers with token ids
and log-probs, each challenge's score parts, the epoch seed's signature and anchor, the attested epoch score). The
runner (``verifier._runner``) builds it; this module fixes only what every record has — ``node`` (address),
``epoch`` (integer) and ``verifier`` (address), which name its file — and how it becomes bytes:

- **canonical JSON**: UTF-8, object keys sorted, no whitespace, no ``NaN``/``Infinity`` (the caller maps a
  non-finite float to ``null``), integers exact, floats in Python's shortest round-trip form; values are objects
  with string keys, arrays, strings, integers, floats, booleans and null (bytes must be 0x-hex strings). One record,
  one byte string, one hash; a file that parses but is not in canonical form is refused too (two byte strings must
  never stand for one record);
- **bounded**: at most :data:`MAX_RECORD_BYTES` per record (``max_record_bytes``), checked before writing and before
  reading; a file over the bound is refused without being read whole.

**On disk**: ``<root>/epoch-<epoch>/<node>.<hash>.json`` (``hash`` is 64 lower-case hex digits), written to a
temporary file, fsynced and renamed into place, so a crash leaves either no record or a whole one. The epoch and node
in the name make listing cheap (:meth:`EvidenceStore.entries`); reading checks them against the record.

:func:`check_record` goes beyond integrity: it verifies the epoch seed's signature (``verifier._epoch``), that the
seed is ``keccak256`` of it, and, where the record carries the schedule's inputs, that the challenges are exactly
the ones the seed plans (a verifier cannot leave out the challenges a node answered well).
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from verifier._epoch import (
    AnchorBlock,
    AnchorMismatch,
    AuditPolicy,
    BlockSource,
    EpochSeed,
    InvalidEpochSeed,
    epoch_bounds,
    keccak256,
    plan_epoch,
    verify_anchor,
    verify_epoch_seed,
)
from verifier._errors import (
    EvidenceNotFound,
    EvidenceTampered,
    EvidenceTooLarge,
    InvalidVerifierInput,
    VerifierError,
)

#: Default bound on one record's canonical bytes (4 MiB: 64 challenges of 1,024 answer tokens each fit, at about
#: 30 bytes a token with its id, log-prob and text; challenges ask for at most 64).
MAX_RECORD_BYTES = 4 * 1024 * 1024
#: Largest bound a store may be configured with.
MAX_RECORD_BYTES_LIMIT = 64 * 1024 * 1024
#: Deepest nesting a record may have (JSON parsing recurses; a hostile file must not exhaust the stack).
MAX_DEPTH = 32
_HASH = re.compile(r"^(0x)?([0-9a-fA-F]{64})$")
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_FILE = re.compile(r"^(0x[0-9a-fA-F]{40})\.([0-9a-f]{64})\.json$")
_EPOCH_DIR = re.compile(r"^epoch-(0|[1-9][0-9]{0,18})$")


def _check_value(value: Any, depth: int, where: str) -> None:
    if depth > MAX_DEPTH:
        raise InvalidVerifierInput(where, "<nested>", f"at most {MAX_DEPTH} levels deep")
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidVerifierInput(where, value, "a finite number (map NaN and infinities to null)")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidVerifierInput(where, key, "object keys must be strings")
            _check_value(item, depth + 1, f"{where}.{key}")
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_value(item, depth + 1, f"{where}[{index}]")
        return
    raise InvalidVerifierInput(where, type(value).__name__, "JSON values only (hex-encode bytes)")


def canonical_json(record: Mapping[str, Any]) -> bytes:
    """The record's canonical bytes (see the module docstring); raises ``InvalidVerifierInput`` on a value JSON
    cannot carry exactly."""
    if not isinstance(record, Mapping):
        raise InvalidVerifierInput("record", type(record).__name__, "a JSON object")
    _check_value(record, 0, "record")
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8")


def evidence_hash(record: Mapping[str, Any]) -> bytes:
    """``keccak256(canonical_json(record))``: the ``evidenceHash`` attested on chain."""
    return keccak256(canonical_json(record))


def parse_hash(value: str | bytes) -> bytes:
    """A 32-byte evidence hash from 32 bytes or 64 hex digits (``0x`` optional, any case)."""
    if isinstance(value, bytes):
        if len(value) != 32:
            raise InvalidVerifierInput("evidence_hash", value.hex(), "32 bytes")
        return value
    match = _HASH.match(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise InvalidVerifierInput("evidence_hash", value, "0x and 64 hex digits")
    return bytes.fromhex(match.group(2))


def _identity(record: Mapping[str, Any]) -> tuple[str, int]:
    """``(node, epoch)`` of a record: what its file is named by."""
    from eth_utils.address import to_checksum_address

    for name in ("node", "verifier"):
        value = record.get(name)
        if not isinstance(value, str) or not _ADDRESS.match(value):
            raise InvalidVerifierInput(f"record.{name}", value, "a 0x address")
    epoch = record.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or not 0 <= epoch < 2**63:
        raise InvalidVerifierInput("record.epoch", epoch, "an integer in [0, 2**63)")
    return str(to_checksum_address(record["node"])), epoch


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredEvidence:
    """One record in the store, as its file name describes it (:meth:`EvidenceStore.get` verifies the content)."""

    #: ``0x`` + 64 hex digits: the record's keccak-256.
    evidence_hash: str
    #: The audited node (checksummed address).
    node: str
    #: The epoch.
    epoch: int
    #: The file.
    path: Path
    #: The file's size in bytes.
    size: int


class EvidenceStore:
    """Evidence records under ``root`` (created 0700 on first write), each at most ``max_record_bytes``."""

    def __init__(self, root: Path, *, max_record_bytes: int = MAX_RECORD_BYTES) -> None:
        if not isinstance(max_record_bytes, int) or not 1024 <= max_record_bytes <= MAX_RECORD_BYTES_LIMIT:
            raise InvalidVerifierInput(
                "max_record_bytes", max_record_bytes, f"in [1024, {MAX_RECORD_BYTES_LIMIT}] bytes"
            )
        self.root = Path(root)
        self.max_record_bytes = max_record_bytes

    def __repr__(self) -> str:
        return f"EvidenceStore({str(self.root)!r})"

    def put(self, record: Mapping[str, Any]) -> bytes:
        """Store ``record`` and return its 32-byte keccak-256 (the ``evidenceHash`` to attest).

        Idempotent: storing the same record again returns the same hash and leaves the file as it was (after
        checking it). Raises :class:`EvidenceTooLarge` over the bound, ``InvalidVerifierInput`` on a value
        canonical JSON cannot carry or a record without ``node``, ``verifier`` and ``epoch``.
        """
        node, epoch = _identity(record)
        data = canonical_json(record)
        if len(data) > self.max_record_bytes:
            raise EvidenceTooLarge(size=len(data), limit=self.max_record_bytes)
        digest = keccak256(data)
        folder = self.root / f"epoch-{epoch}"
        path = folder / f"{node}.{digest.hex()}.json"
        if path.exists():
            self._read_verified(path, digest)
            return digest
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        temporary = folder / f".{digest.hex()}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        return digest

    def find(self, value: str | bytes) -> Path:
        """The file holding the record with this hash (:class:`EvidenceNotFound` when none)."""
        digest = parse_hash(value)
        suffix = f".{digest.hex()}.json"
        if self.root.is_dir():
            for folder in sorted(self.root.iterdir()):
                if not folder.is_dir() or not _EPOCH_DIR.match(folder.name):
                    continue
                for path in folder.iterdir():
                    if path.name.endswith(suffix) and _FILE.match(path.name):
                        return path
        raise EvidenceNotFound(evidence_hash="0x" + digest.hex(), store=str(self.root))

    def raw(self, value: str | bytes) -> bytes:
        """The record's canonical bytes, checked against its hash (:class:`EvidenceTampered` when they differ)."""
        digest = parse_hash(value)
        return self._read_verified(self.find(digest), digest)

    def get(self, value: str | bytes) -> dict[str, Any]:
        """The record with this hash, re-verified: :class:`EvidenceNotFound`, or :class:`EvidenceTampered` when the
        file no longer hashes to its name, is not canonical JSON, or names another node or epoch than it holds."""
        digest = parse_hash(value)
        path = self.find(digest)
        record = _decode(self._read_verified(path, digest), digest, path)
        match = _FILE.match(path.name)
        assert match is not None  # find() returns only matching names
        try:
            node, epoch = _identity(record)
        except InvalidVerifierInput as exc:
            raise EvidenceTampered(evidence_hash="0x" + digest.hex(), path=str(path), detail=str(exc)) from exc
        if node != match.group(1) or f"epoch-{epoch}" != path.parent.name:
            raise EvidenceTampered(
                evidence_hash="0x" + digest.hex(), path=str(path), detail="its node or epoch differs from its name"
            )
        return record

    def entries(self, *, epoch: int | None = None, node: str | None = None) -> list[StoredEvidence]:
        """Records in the store (optionally of one epoch and/or node), by epoch then node, from their file names.

        Cheap (no file is read); :meth:`get` verifies a record's content.
        """
        found: list[StoredEvidence] = []
        if not self.root.is_dir():
            return found
        wanted_node = None if node is None else node.lower()
        for folder in self.root.iterdir():
            folder_match = _EPOCH_DIR.match(folder.name)
            if not folder.is_dir() or folder_match is None:
                continue
            folder_epoch = int(folder_match.group(1))
            if epoch is not None and folder_epoch != epoch:
                continue
            for path in folder.iterdir():
                match = _FILE.match(path.name)
                if match is None or (wanted_node is not None and match.group(1).lower() != wanted_node):
                    continue
                found.append(
                    StoredEvidence(
                        evidence_hash="0x" + match.group(2),
                        node=match.group(1),
                        epoch=folder_epoch,
                        path=path,
                        size=path.stat().st_size,
                    )
                )
        return sorted(found, key=lambda e: (e.epoch, e.node.lower(), e.evidence_hash))

    def _read_verified(self, path: Path, digest: bytes) -> bytes:
        shown = "0x" + digest.hex()
        try:
            with path.open("rb") as stream:
                data = stream.read(self.max_record_bytes + 1)
        except OSError as exc:
            raise EvidenceTampered(evidence_hash=shown, path=str(path), detail=f"unreadable ({exc.strerror})") from exc
        if len(data) > self.max_record_bytes:
            raise EvidenceTampered(
                evidence_hash=shown, path=str(path), detail=f"larger than the {self.max_record_bytes}-byte bound"
            )
        if keccak256(data) != digest:
            raise EvidenceTampered(evidence_hash=shown, path=str(path), detail="its content no longer hashes to it")
        return data


def _decode(data: bytes, digest: bytes, path: Path) -> dict[str, Any]:
    shown = "0x" + digest.hex()
    try:
        record = json.loads(data.decode("utf-8"), parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise EvidenceTampered(evidence_hash=shown, path=str(path), detail="not a JSON record") from exc
    if not isinstance(record, dict):
        raise EvidenceTampered(evidence_hash=shown, path=str(path), detail="not a JSON object")
    try:
        canonical = canonical_json(record)
    except InvalidVerifierInput as exc:
        raise EvidenceTampered(evidence_hash=shown, path=str(path), detail=str(exc)) from exc
    if canonical != data:
        raise EvidenceTampered(evidence_hash=shown, path=str(path), detail="not in canonical form")
    return record


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in evidence")


# -- what a record carries so that it can be checked ------------------------------------------------------------


def record_header(
    seed: EpochSeed, *, policy: AuditPolicy, epoch_start: int, epoch_length: int, salt_commitment: bytes
) -> dict[str, Any]:
    """The fields a record needs for :func:`check_record` to verify it: merge them into the record (``record |
    record_header(...)``) and give each challenge entry its planned ``send_at_ms``, in plan order.

    ``epoch_start``/``epoch_length`` are the contract's (``Attestations.epoch_start()``/``epoch_length()``);
    ``salt_commitment`` is ``verifier._prompts.salt_commitment(salt)``.
    """
    if not isinstance(salt_commitment, bytes) or len(salt_commitment) != 32:
        raise InvalidVerifierInput("salt_commitment", "<bytes>", "32 bytes: keccak256 of the prompt salt")
    return {
        "chain_id": seed.chain_id,
        "attestations": seed.attestations,
        "epoch_start": epoch_start,
        "epoch_length": epoch_length,
        "policy": policy.to_json(),
        "salt_commitment": "0x" + salt_commitment.hex(),
        "seed": seed.to_json(),
    }


# -- checking a record's content ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class EvidenceCheck:
    """What :func:`check_record` could establish about a record beyond its hash (None: not checkable from it)."""

    #: The epoch seed's signature is the verifier's canonical signature over its ``EpochSeed`` message.
    signature_valid: bool | None
    #: The challenges are exactly those the seed plans for the node (count and send times).
    schedule_matches: bool | None
    #: What failed or could not be checked, one short phrase each.
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """Nothing checked failed."""
        return self.signature_valid is not False and self.schedule_matches is not False


def seed_from_record(record: Mapping[str, Any]) -> EpochSeed | None:
    """The :class:`EpochSeed` a record carries (``record["seed"]`` in :meth:`EpochSeed`'s JSON shape, fields it
    lacks taken from the record's top level), or None when it lacks any of chain id, contract or signature."""
    seed = record.get("seed")
    if not isinstance(seed, Mapping):
        return None

    def field(name: str) -> Any:
        return seed.get(name, record.get(name))

    anchor = seed.get("anchor")
    signature, chain_id, contract = field("signature"), field("chain_id"), field("attestations")
    if not isinstance(anchor, Mapping) or not isinstance(signature, str) or chain_id is None or contract is None:
        return None
    try:
        return EpochSeed(
            chain_id=chain_id,
            attestations=contract,
            verifier=field("verifier"),
            epoch=field("epoch"),
            anchor=AnchorBlock(
                number=anchor["number"],
                hash=bytes.fromhex(str(anchor["hash"]).removeprefix("0x")),
                timestamp=anchor["timestamp"],
            ),
            signature=bytes.fromhex(signature.removeprefix("0x")),
        )
    except (KeyError, ValueError, TypeError, VerifierError):
        return None


def check_record(record: Mapping[str, Any]) -> EvidenceCheck:
    """Check a record's epoch seed and schedule (see :class:`EvidenceCheck`); never raises on a bad record."""
    problems: list[str] = []
    seed = seed_from_record(record)
    signature_valid: bool | None = None
    if seed is None:
        problems.append("the seed is not checkable: the record lacks its chain id, contract, anchor or signature")
    else:
        try:
            verify_epoch_seed(seed)
            signature_valid = True
        except InvalidEpochSeed as exc:
            signature_valid = False
            problems.append(f"seed signature: {exc.reason}")
        claimed = record.get("seed", {}).get("seed")
        if isinstance(claimed, str) and claimed.lower().removeprefix("0x") != seed.seed.hex():
            signature_valid = False
            problems.append("the seed is not keccak256 of the signature")
        if seed.verifier.lower() != str(record.get("verifier", "")).lower():
            signature_valid = False
            problems.append("the seed is signed by another verifier than the record's")
    schedule_matches = None if seed is None else _check_schedule(record, seed, problems)
    return EvidenceCheck(signature_valid=signature_valid, schedule_matches=schedule_matches, problems=tuple(problems))


def _check_schedule(record: Mapping[str, Any], seed: EpochSeed, problems: list[str]) -> bool | None:
    """Compare the record's challenge times with the plan, when it carries ``epoch_start``, ``epoch_length``,
    ``policy`` and each challenge's ``send_at_ms`` (a sampled plan's selection is not checked: it depends on every
    node of the epoch)."""
    challenges = record.get("challenges")
    policy = record.get("policy")
    start, length = record.get("epoch_start"), record.get("epoch_length")
    if not isinstance(challenges, list) or not isinstance(policy, Mapping) or start is None or length is None:
        problems.append("the schedule is not checkable: the record lacks epoch_start, epoch_length or policy")
        return None
    try:
        plan = plan_epoch(
            seed.seed,
            epoch=seed.epoch,
            epoch_start=start,
            epoch_length=length,
            nodes=[record["node"]],
            policy=AuditPolicy(
                mean_challenges=policy["mean_challenges"],
                min_challenges=policy["min_challenges"],
                max_challenges=policy["max_challenges"],
            ),
            not_before=seed.anchor.timestamp,
        )
        sent = [c.get("send_at_ms") if isinstance(c, Mapping) else None for c in challenges]
    except (KeyError, TypeError, VerifierError) as exc:
        problems.append(f"the schedule is not checkable: {exc}")
        return None
    planned = [c.send_at_ms for c in plan.for_node(record["node"])]
    if sent != planned:
        problems.append(f"the challenges differ from the plan ({len(sent)} recorded, {len(planned)} planned)")
        return False
    return True


def check_anchor(record: Mapping[str, Any], source: BlockSource, *, chain_id: int) -> tuple[bool | None, str]:
    """Whether the record's anchor block is, on the chain ``source`` reads (id ``chain_id``), the first block of its
    epoch: ``(True, "")``, ``(False, why)``, or ``(None, why)`` when the record lacks what the check needs."""
    seed = seed_from_record(record)
    start, length = record.get("epoch_start"), record.get("epoch_length")
    if seed is None or not isinstance(start, int) or not isinstance(length, int):
        return None, "the anchor is not checkable: the record lacks its seed or epoch bounds"
    if seed.chain_id != chain_id:
        return False, f"the record is for chain {seed.chain_id}, this chain is {chain_id}"
    try:
        begin, _ = epoch_bounds(start, length, seed.epoch)
        verify_anchor(source, seed.anchor, begin)
    except (AnchorMismatch, InvalidVerifierInput) as exc:
        return False, str(exc)
    return True, ""
