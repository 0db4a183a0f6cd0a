"""A verifier's standing, read from the chain, the indexer and its own evidence store (``ps-verifier status``).

Why three sources: the registry says whether the verifier may attest at all (registered, staked, not jailed); the
indexed ``AttestationSubmitted`` events say what it attested, per epoch and node, and the contract's tallies
whether those epochs reached a verdict; the local evidence store says which of its records exist and, crossed with
the chain, which were never attested (an attestation that reverted or was never sent) — what an operator looks at
after a restart or a failed epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ledger import Attestations, Indexer, NodeRegistry
    from verifier._evidence import EvidenceStore


@dataclass(frozen=True, slots=True, kw_only=True)
class AttestationView:
    """One of the verifier's attestations, with its epoch's verdict so far."""

    #: The epoch attested.
    epoch: int
    #: The model node attested (checksummed).
    node: str
    #: The score attested, fixed-point (1e6 = 1.0).
    score: int
    #: ``0x`` + 64 hex digits: the evidence hash attested.
    evidence_hash: str
    #: Whether that node's epoch reached quorum.
    finalized: bool
    #: The quorum's median (None until finalized).
    median: int | None
    #: Whether the verdict failed the threshold (None until finalized).
    failed: bool | None
    #: Whether the record is in this verifier's evidence store.
    in_store: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifierStatus:
    """What ``ps-verifier status`` shows."""

    #: The verifier's operator address.
    verifier: str
    #: Registered in the registry (as any role).
    registered: bool
    #: Its role's name ("verifier" when it may attest), None when not registered.
    role: str | None
    #: Bonded stake in wei.
    stake_wei: int
    #: Routable/allowed: bonded, not jailed, stake at least the minimum.
    active: bool
    #: Jailed by a slash.
    jailed: bool
    #: The model id it verifies (0x hex), None when not registered.
    model_id: str | None
    #: The contract's current epoch and its bounds, Unix seconds; None without an Attestations contract.
    current_epoch: int | None
    epoch_start: int | None
    epoch_length: int | None
    #: Committee size, quorum and threshold (fixed-point) of the contract.
    committee_size: int | None
    quorum: int | None
    score_threshold: int | None
    #: Its attestations in the shown epochs, newest epoch first.
    attestations: tuple[AttestationView, ...]
    #: Records in its store (shown epochs) that no attestation of it names: (epoch, node, evidence hash).
    unattested: tuple[tuple[int, str, str], ...]
    #: All its attestations on chain, and all records in its store (every epoch).
    total_attestations: int
    total_records: int

    def to_json(self) -> dict[str, Any]:
        """JSON-ready (wei as decimal strings)."""
        return {
            "verifier": self.verifier,
            "registered": self.registered,
            "role": self.role,
            "stake_wei": str(self.stake_wei),
            "active": self.active,
            "jailed": self.jailed,
            "model_id": self.model_id,
            "current_epoch": self.current_epoch,
            "epoch_start": self.epoch_start,
            "epoch_length": self.epoch_length,
            "committee_size": self.committee_size,
            "quorum": self.quorum,
            "score_threshold": self.score_threshold,
            "attestations": [
                {
                    "epoch": a.epoch,
                    "node": a.node,
                    "score": a.score,
                    "evidence_hash": a.evidence_hash,
                    "finalized": a.finalized,
                    "median": a.median,
                    "failed": a.failed,
                    "in_store": a.in_store,
                }
                for a in self.attestations
            ],
            "unattested": [{"epoch": e, "node": n, "evidence_hash": h} for e, n, h in self.unattested],
            "total_attestations": self.total_attestations,
            "total_records": self.total_records,
        }


def verifier_status(
    *,
    verifier: str,
    registry: NodeRegistry,
    attestations: Attestations | None,
    indexer: Indexer | None,
    store: EvidenceStore,
    epochs: int = 10,
) -> VerifierStatus:
    """The verifier's status over its latest ``epochs`` epochs (1..1000; the contract's current epoch and back).

    ``indexer`` should be synced by the caller; without it (or without ``attestations``) only the registry and the
    store are read.
    """
    from ledger import Role, checksum
    from verifier._errors import InvalidVerifierInput

    if not isinstance(epochs, int) or not 1 <= epochs <= 1000:
        raise InvalidVerifierInput("epochs", epochs, "in [1, 1000]")
    address = checksum(verifier, param="verifier")
    node = registry.get_node(address)
    current = attestations.current_epoch() if attestations is not None else None
    first_shown = 0 if current is None else max(0, current - epochs + 1)
    threshold = attestations.score_threshold() if attestations is not None else None
    records = store.entries()
    stored = {r.evidence_hash.lower() for r in records}
    mine: list[tuple[int, str, int, str]] = []
    if indexer is not None:
        for model in indexer.nodes(include_deregistered=True):
            if model.role is not Role.MODEL:
                continue
            for epoch, by, score, evidence in indexer.attestations(model.operator):
                if by == address:
                    mine.append((epoch, model.operator, score, "0x" + evidence.lower()))
    views: list[AttestationView] = []
    for epoch, model_node, score, evidence in sorted(mine, key=lambda a: (-a[0], a[1].lower())):
        if epoch < first_shown:
            continue
        tally = attestations.tally(model_node, epoch) if attestations is not None else None
        finalized = bool(tally is not None and tally.finalized)
        median = tally.median if tally is not None and finalized else None
        views.append(
            AttestationView(
                epoch=epoch,
                node=model_node,
                score=score,
                evidence_hash=evidence,
                finalized=finalized,
                median=median,
                failed=None if median is None or threshold is None else median < threshold,
                in_store=evidence in stored,
            )
        )
    attested = {a[3] for a in mine}
    unattested = tuple(
        (r.epoch, r.node, r.evidence_hash)
        for r in records
        if r.epoch >= first_shown and r.evidence_hash.lower() not in attested
    )
    return VerifierStatus(
        verifier=address,
        registered=node is not None,
        role=None if node is None else node.role.name.lower(),
        stake_wei=0 if node is None else int(node.stake),
        active=bool(node is not None and node.active),
        jailed=bool(node is not None and getattr(node, "jailed", False)),
        model_id=None if node is None else _hex_id(node.model_id),
        current_epoch=current,
        epoch_start=attestations.epoch_start() if attestations is not None else None,
        epoch_length=attestations.epoch_length() if attestations is not None else None,
        committee_size=attestations.committee_size() if attestations is not None else None,
        quorum=attestations.quorum() if attestations is not None else None,
        score_threshold=threshold,
        attestations=tuple(views),
        unattested=unattested,
        total_attestations=len(mine),
        total_records=len(records),
    )


def _hex_id(value: object) -> str:
    """A model id as 0x hex, whether the ledger hands it over as bytes or as a 0x string."""
    return "0x" + value.hex() if isinstance(value, bytes) else str(value).lower()
