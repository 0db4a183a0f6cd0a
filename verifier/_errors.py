"""The verifier layer's errors: one base, :class:`VerifierError`, under the kernel's root error.

Each leaf is named for what went wrong and carries the fields a caller branches on. Add leaves here (one concept
each); the CLI maps them to exit codes by class (``cli/_main.py``).
"""

from __future__ import annotations

from planetserve import PlanetServeError


class VerifierError(PlanetServeError):
    """Base of the errors raised by ``verifier``."""

    code = "verifier_error"


class InvalidVerifierInput(VerifierError):
    """A value handed to the verifier is out of range (``param``, ``value``, what it must be)."""

    code = "verifier_invalid_input"

    def __init__(self, param: str, value: object, expected: str) -> None:
        self.param = param
        self.value = value
        self.expected = expected
        super().__init__(f"{param}={value!r}: {expected}")


class EvidenceNotFound(VerifierError):
    """No evidence record with this hash is in the store."""

    code = "verifier_evidence_not_found"

    def __init__(self, *, evidence_hash: str, store: str) -> None:
        self.evidence_hash = evidence_hash
        self.store = store
        super().__init__(f"no evidence {evidence_hash} in {store}")


class EvidenceTampered(VerifierError):
    """A stored evidence record no longer hashes to its name, or is not a valid record: it was changed on disk."""

    code = "verifier_evidence_tampered"

    def __init__(self, *, evidence_hash: str, path: str, detail: str) -> None:
        self.evidence_hash = evidence_hash
        self.path = path
        self.detail = detail
        super().__init__(f"evidence {evidence_hash} at {path} is refused: {detail}")


class EvidenceTooLarge(VerifierError):
    """An evidence record would exceed the store's per-record bound."""

    code = "verifier_evidence_too_large"

    def __init__(self, *, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"an evidence record of {size} bytes exceeds the {limit}-byte bound")
