"""PlanetServe verifier: challenges, scoring, committee and attestations (being built)."""

from verifier._calibrate import calibrate, collect_answers
from verifier._calibration import (
    Calibration,
    CalibrationFileError,
    Tolerance,
    UncalibratedEnginePair,
)
from verifier._scoring import Answer, Challenge, ChallengeScore, Scorer
from verifier._sequential import CusumParams, CusumState, SequentialTest, design_cusum, epoch_score

__all__ = [
    "Answer",
    "Calibration",
    "CalibrationFileError",
    "Challenge",
    "ChallengeScore",
    "CusumParams",
    "CusumState",
    "Scorer",
    "SequentialTest",
    "Tolerance",
    "UncalibratedEnginePair",
    "calibrate",
    "collect_answers",
    "design_cusum",
    "epoch_score",
]
