"""PlanetServe verifier: challenges, scoring, committee and attestations (being built)."""

from verifier._calibration import (
    Calibration,
    CalibrationFileError,
    Tolerance,
    UncalibratedEnginePair,
)
from verifier._scoring import Answer, Challenge, ChallengeScore, Scorer

__all__ = [
    "Answer",
    "Calibration",
    "CalibrationFileError",
    "Challenge",
    "ChallengeScore",
    "Scorer",
    "Tolerance",
    "UncalibratedEnginePair",
]
