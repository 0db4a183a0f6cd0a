"""Calibration: how far an honest node's answer may differ from the verifier's own, per engine pair.

An honest model node runs the same model as the verifier, but not the same computation: it decodes token by token
from a KV cache, batched with other users' requests, while the verifier teacher-forces the whole answer in one pass
(and may run another engine, e.g. TensorRT-LLM in bf16 against torch in fp32). Per-token log-probs therefore differ
by floating-point noise, and very rarely two candidate tokens are so close that the noise flips the choice. A
verifier that demanded bit-equality would punish honest nodes; one with a loose tolerance would pass a quantized
model. So the tolerance is *measured* on honest answers, per (node engine, reference engine) pair, and written to a
JSON file that the verifier loads (``Calibration.load``); the package ships the fp32/fp32 one
(``Calibration.default()``, measured by ``bench/verification.py --calibrate``). A pair that was never measured is
refused (``UncalibratedEnginePair``) rather than silently given a guess.

The file also carries the honest per-challenge score distribution that the sequential test's false-alarm bound is
derived from (``verifier._sequential.design_cusum``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from verifier._errors import InvalidVerifierInput, VerifierError

#: The engine label of the project's torch engine in float32 (what ``TorchEngine`` runs on CPU).
TORCH_FP32 = "torch-fp32"
#: The label of TensorRT-LLM in bfloat16 (not measured: no GPU or TensorRT-LLM where this was built).
TRTLLM_BF16 = "trtllm-bf16"
#: Calibration file format version.
CALIBRATION_VERSION = 1
#: Largest calibration file read, in bytes (the shipped one is a few KiB).
MAX_CALIBRATION_BYTES = 1 << 20
#: Most honest scores kept in a calibration (bounds the file and the CUSUM design's work).
MAX_HONEST_SCORES = 20_000
_DEFAULT_FILE = "calibration.json"


class UncalibratedEnginePair(VerifierError):
    """No tolerance was measured for this (node engine, reference engine) pair."""

    code = "verifier_uncalibrated_engine_pair"

    def __init__(self, *, node_engine: str, reference_engine: str, known: tuple[str, ...]) -> None:
        self.node_engine = node_engine
        self.reference_engine = reference_engine
        self.known = known
        super().__init__(
            f"no calibration for {node_engine} answers checked on {reference_engine} "
            f"(calibrated: {', '.join(known) or 'none'}); run bench/verification.py --calibrate on that pair"
        )


class CalibrationFileError(VerifierError):
    """A calibration file is missing, too large or not a valid calibration."""

    code = "verifier_calibration_file"

    def __init__(self, *, path: str, detail: str) -> None:
        self.path = path
        self.detail = detail
        super().__init__(f"calibration {path}: {detail}")


def pair_key(node_engine: str, reference_engine: str) -> str:
    """The table key of an engine pair, ``"node/reference"``."""
    return f"{node_engine}/{reference_engine}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Tolerance:
    """What honest noise looks like between one node engine and one reference engine."""

    #: Largest per-token |reported log-prob - reference log-prob| still counted as exact, in nats (> 0).
    logprob_abs: float
    #: At a greedy divergence, the largest reference log-prob gap (its own token minus the node's) that is still
    #: explained by numerical noise, in nats (> 0).
    tie_gap: float
    #: Scale of the likelihood part: a mean per-token log-prob this many nats below the replay's costs a factor e.
    likelihood_scale: float = 1.0
    #: Largest |reported - reference| seen on honest answers when measured, in nats (0 when not measured).
    measured_max_abs: float = 0.0
    #: 99.9th percentile of the same, in nats.
    measured_p999_abs: float = 0.0
    #: Honest tokens the measurement covered.
    measured_tokens: int = 0
    #: How the numbers were obtained (conditions), for the record.
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("logprob_abs", "tie_gap", "likelihood_scale"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise InvalidVerifierInput(name, value, "a finite number > 0")

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "logprob_abs": self.logprob_abs,
            "tie_gap": self.tie_gap,
            "likelihood_scale": self.likelihood_scale,
            "measured_max_abs": self.measured_max_abs,
            "measured_p999_abs": self.measured_p999_abs,
            "measured_tokens": self.measured_tokens,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Tolerance:
        """Inverse of ``to_dict``."""
        return cls(
            logprob_abs=float(raw["logprob_abs"]),
            tie_gap=float(raw["tie_gap"]),
            likelihood_scale=float(raw.get("likelihood_scale", 1.0)),
            measured_max_abs=float(raw.get("measured_max_abs", 0.0)),
            measured_p999_abs=float(raw.get("measured_p999_abs", 0.0)),
            measured_tokens=int(raw.get("measured_tokens", 0)),
            source=str(raw.get("source", "")),
        )


def tolerance_from_errors(errors: list[float], *, safety: float = 20.0, floor: float = 1e-4, source: str) -> Tolerance:
    """A tolerance from measured honest per-token |reported - reference| log-prob errors.

    ``safety`` times the largest error seen (at least ``floor`` nats): honest noise in fp32 is ~1e-6 nats, a
    quantized or substituted model's ~1e-2, so a wide margin on the honest side still leaves two orders of magnitude.
    """
    if not errors:
        raise InvalidVerifierInput("errors", 0, "at least one measured token")
    ordered = sorted(abs(e) for e in errors)
    top = ordered[-1]
    p999 = ordered[min(len(ordered) - 1, math.ceil(0.999 * len(ordered)) - 1)]
    tol = max(floor, safety * top)
    return Tolerance(
        logprob_abs=tol,
        tie_gap=tol,
        measured_max_abs=top,
        measured_p999_abs=p999,
        measured_tokens=len(ordered),
        source=source,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Calibration:
    """Tolerances per engine pair plus the honest per-challenge scores they produced (see the module docstring)."""

    #: ``pair_key(node, reference)`` -> tolerance.
    tolerances: Mapping[str, Tolerance]
    #: ``pair_key`` -> per-challenge scores of honest answers measured with that pair's tolerance (0..1 each; at
    #: most MAX_HONEST_SCORES per pair); what ``design_cusum`` derives the false-alarm bound from.
    honest_scores: Mapping[str, tuple[float, ...]] = field(default_factory=dict, repr=False)
    #: ``pair_key`` -> conditions of the honest measurement (model, temperatures, prompts, batching), for the record.
    conditions: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.tolerances:
            raise InvalidVerifierInput("tolerances", 0, "at least one engine pair")
        for key, scores in self.honest_scores.items():
            if len(scores) > MAX_HONEST_SCORES:
                raise InvalidVerifierInput("honest_scores", len(scores), f"at most {MAX_HONEST_SCORES} per pair")
            for s in scores:
                if not (isinstance(s, (int, float)) and 0.0 <= s <= 1.0):
                    raise InvalidVerifierInput("honest_scores", s, f"each in [0, 1] ({key})")

    def honest(self, node_engine: str = TORCH_FP32, reference_engine: str = TORCH_FP32) -> tuple[float, ...]:
        """The honest per-challenge scores measured on one pair (``UncalibratedEnginePair`` when none were)."""
        self.tolerance(node_engine, reference_engine)
        found = self.honest_scores.get(pair_key(node_engine, reference_engine))
        if not found:
            raise UncalibratedEnginePair(
                node_engine=node_engine, reference_engine=reference_engine, known=tuple(sorted(self.honest_scores))
            )
        return found

    def with_pair(
        self,
        node_engine: str,
        reference_engine: str,
        tolerance: Tolerance,
        honest_scores: tuple[float, ...],
        conditions: Mapping[str, Any],
    ) -> Calibration:
        """A copy with one pair's row added or replaced (the other pairs kept)."""
        key = pair_key(node_engine, reference_engine)
        return Calibration(
            tolerances={**self.tolerances, key: tolerance},
            honest_scores={**self.honest_scores, key: honest_scores},
            conditions={**self.conditions, key: dict(conditions)},
        )

    def tolerance(self, node_engine: str = TORCH_FP32, reference_engine: str = TORCH_FP32) -> Tolerance:
        """The tolerance of one pair; ``UncalibratedEnginePair`` when it was never measured."""
        found = self.tolerances.get(pair_key(node_engine, reference_engine))
        if found is None:
            raise UncalibratedEnginePair(
                node_engine=node_engine, reference_engine=reference_engine, known=tuple(sorted(self.tolerances))
            )
        return found

    def to_dict(self) -> dict[str, Any]:
        """JSON form (what ``save`` writes)."""
        return {
            "version": CALIBRATION_VERSION,
            "tolerances": {k: v.to_dict() for k, v in sorted(self.tolerances.items())},
            "honest_scores": {k: [round(x, 9) for x in v] for k, v in sorted(self.honest_scores.items())},
            "conditions": {k: dict(v) for k, v in sorted(self.conditions.items())},
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Calibration:
        """Inverse of ``to_dict``; ``InvalidVerifierInput`` on a malformed table."""
        if raw.get("version") != CALIBRATION_VERSION:
            raise InvalidVerifierInput("version", raw.get("version"), f"calibration version {CALIBRATION_VERSION}")
        table = raw.get("tolerances")
        if not isinstance(table, dict):
            raise InvalidVerifierInput("tolerances", type(table).__name__, "an object keyed by engine pair")
        return cls(
            tolerances={str(k): Tolerance.from_dict(v) for k, v in table.items()},
            honest_scores={str(k): tuple(float(x) for x in v) for k, v in raw.get("honest_scores", {}).items()},
            conditions={str(k): dict(v) for k, v in raw.get("conditions", {}).items()},
        )

    def save(self, path: str | Path) -> None:
        """Write the JSON file ``load`` reads."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """Read a calibration file (at most MAX_CALIBRATION_BYTES); ``CalibrationFileError`` when unusable."""
        p = Path(path)
        try:
            size = p.stat().st_size
            if size > MAX_CALIBRATION_BYTES:
                raise CalibrationFileError(path=str(p), detail=f"{size} bytes, over {MAX_CALIBRATION_BYTES}")
            raw = json.loads(p.read_text(encoding="utf-8"))
        except OSError as exc:
            raise CalibrationFileError(path=str(p), detail=exc.strerror or type(exc).__name__) from exc
        except ValueError as exc:
            raise CalibrationFileError(path=str(p), detail="not JSON") from exc
        if not isinstance(raw, dict):
            raise CalibrationFileError(path=str(p), detail="not a JSON object")
        try:
            return cls.from_dict(raw)
        except (InvalidVerifierInput, KeyError, TypeError, ValueError) as exc:
            raise CalibrationFileError(path=str(p), detail=f"invalid: {exc}") from exc

    @classmethod
    def default(cls) -> Calibration:
        """The shipped fp32/fp32 calibration (``verifier/calibration.json``, measured by ``bench/verification.py``)."""
        ref = resources.files("verifier").joinpath(_DEFAULT_FILE)
        with resources.as_file(ref) as path:
            return cls.load(path)
