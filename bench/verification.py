"""Verification: per-challenge scores of honest and cheating nodes, and what the sequential test makes of them.

Run ``python bench/verification.py`` (``--quick`` for the quick recipe, ``--calibrate`` to rewrite the shipped
``verifier/calibration.json`` from this run's calibration phase). It builds (or reuses) the default model and its
variants under ``build/models``, then:

1. **Calibration** (``--calibrate``; otherwise the shipped ``verifier/calibration.json`` is used): prompts from the
   user distribution (``verifier._prompts.user_request``, fixed seeds); an honest node (a separate ``TorchEngine``
   instance, up to 16 requests batched, every wave of challenges served beside as many concurrent unrelated
   requests) answers challenges at temperature 0 and 0.8; the reference engine sets the fp32/fp32 tolerance from the
   largest per-token log-prob error and scores them (``verifier._calibrate``), and the file is rewritten.
2. **Measurement** (prompts from another seed, disjoint from the calibration's: any shared prompt is dropped): per
   strategy, real per-challenge scores from the same reference engine: honest at T=0 and T=0.8, each variant served
   as a whole node, ``CheatingEngine`` canned, replay, and 20% substitution with the int8 variant (the hardest).
3. **Resampling** (NOT full network runs): the detection and false-slash rates resample those measured scores.
   A committee of ``--committee`` verifiers each sends ``--per-epoch`` challenges per node per epoch and runs its
   own CUSUM (designed from the calibration: ``verifier._sequential.design_cusum``); the node fails an epoch when the
   median attested score is below 0.5e6, i.e. when a majority of verifiers has raised its alarm. Reported: the share
   of runs failed within 10 epochs and epochs to detection per strategy; the honest false-slash rate per epoch over
   many simulated epochs, with a 95% upper bound, beside the design's analytic bound; the ROC (AUC, points) of the
   per-challenge score per strategy against honest; audit traffic as a fraction of serving traffic at a stated load.

Defaults: 800 calibration challenges (about 11 minutes here), 200 measured challenges per strategy (10 strategies,
about 10 minutes on the 2-core machine under load), 2,000 resampled runs per strategy, 200,000 honest node-epochs.
``--resample FILE`` redoes phase 3 alone on the per-challenge scores an earlier run wrote (they are in the file).
Writes ``bench/results/verification.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from node.inference import EngineConfig, ModelRecipe, TorchEngine, ensure_model
from node.inference import make_variant as build_variant
from node.inference._training import VARIANT_KINDS
from node.inference.testing import CheatConfig, CheatingEngine
from verifier._calibrate import calibrate, collect_answers
from verifier._calibration import TORCH_FP32, Calibration, pair_key
from verifier._prompts import PromptDistribution, user_request
from verifier._scoring import Answer, Challenge, Scorer
from verifier._sequential import PASS_THRESHOLD, CusumParams, design_cusum

RESULTS = Path(__file__).resolve().parent / "results" / "verification.json"
MODELS = Path(__file__).resolve().parents[1] / "build" / "models"
SHIPPED = Path(__file__).resolve().parents[1] / "verifier" / "calibration.json"
CALIBRATION_SEED = 0xCA11B
BENCH_SEED = 0xBE7C4
#: Prompts up to this many characters: the default model's context is 2048 tokens (about a character each).
DISTRIBUTION = PromptDistribution(max_prompt_chars=1200)
#: Detection must happen within this many epochs.
EPOCHS = 10


def _challenges(
    seed: int, n: int, *, temperature: float | None = None, exclude: frozenset[str] = frozenset()
) -> list[Challenge]:
    """``n`` challenges from the user distribution (``temperature`` forced when given), without ``exclude``."""
    rng = random.Random(seed)
    out: list[Challenge] = []
    while len(out) < n:
        req = user_request(rng, DISTRIBUTION)
        if req.prompt in exclude:
            continue
        out.append(
            Challenge(
                prompt=req.prompt,
                max_tokens=req.max_tokens,
                temperature=req.temperature if temperature is None else temperature,
                top_p=req.top_p,
                seed=req.seed,
                stop=req.stop,
            )
        )
    return out


def _noise(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [user_request(rng, DISTRIBUTION).prompt for _ in range(n)]


def _config() -> EngineConfig:
    return EngineConfig(device="cpu", max_running=16, max_queue=256)


def _calibration_challenges(n: int) -> list[Challenge]:
    """The calibration's challenges: half at temperature 0, half at 0.8 (regenerated to exclude them later)."""
    half = n // 2
    return _challenges(CALIBRATION_SEED, half, temperature=0.0) + _challenges(
        CALIBRATION_SEED + 1, n - half, temperature=0.8
    )


async def _score_all(scorer: Scorer, challenges: Sequence[Challenge], answers: Sequence[Answer]) -> list[float]:
    """Scores in waves of 16 concurrent challenges, so the reference engine batches its replays and scores."""
    out: list[float] = []
    pairs = list(zip(challenges, answers, strict=True))
    for start in range(0, len(pairs), 16):
        wave = pairs[start : start + 16]
        out.extend(s.score for s in await asyncio.gather(*(scorer.score(c, a) for c, a in wave)))
    return out


async def _calibrate(base: Path, n: int) -> Calibration:
    """Phase 1: the fp32/fp32 calibration from ``n`` honest challenges (see the module docstring)."""
    challenges = _calibration_challenges(n)
    reference = TorchEngine.from_folder(base, EngineConfig(device="cpu"))
    node = TorchEngine.from_folder(base, _config())
    try:
        answers = await collect_answers(node, challenges, noise_prompts=_noise(7, 64))
        conditions = {
            "model": base.name,
            "challenges": n,
            "temperatures": [0.0, 0.8],
            "prompts": f"bench/verification.py _calibration_challenges({n}): verifier._prompts.user_request "
            f"(max {DISTRIBUTION.max_prompt_chars} characters), seeds {CALIBRATION_SEED} and {CALIBRATION_SEED + 1}",
            "node": "separate TorchEngine (cpu, fp32), waves of 16 challenges beside 16 concurrent other requests",
            "reference": "TorchEngine (cpu, fp32)",
            "platform": platform.machine(),
        }
        return await calibrate(
            reference, challenges, answers, node_engine=TORCH_FP32, reference_engine=TORCH_FP32, conditions=conditions
        )
    finally:
        await node.close()
        await reference.close()


async def _measure(
    folders: dict[str, Path], cal: Calibration, per_strategy: int
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Phase 2: real per-challenge scores per strategy, on prompts disjoint from the calibration's."""
    reference = TorchEngine.from_folder(folders["base"], EngineConfig(device="cpu"))
    noise = _noise(7, 64)
    timings: dict[str, float] = {}
    calibrated_n = int(cal.conditions.get(pair_key(TORCH_FP32, TORCH_FP32), {}).get("challenges", 0))
    exclude = frozenset(c.prompt for c in _calibration_challenges(calibrated_n))
    scorer = Scorer(reference, cal)
    scores: dict[str, list[float]] = {}
    flags: dict[str, list[bool]] = {}

    async def run(name: str, engine: Any, challenges: Sequence[Challenge], warm_up: int = 0) -> None:
        t0 = time.perf_counter()
        if warm_up:  # a replaying cheater needs earlier answers to replay: serve some users first
            await collect_answers(engine, _challenges(BENCH_SEED + 9, warm_up, exclude=exclude))
        before = len(engine.decisions) if isinstance(engine, CheatingEngine) else 0
        got = await collect_answers(engine, challenges, noise_prompts=noise)
        scores[name] = await _score_all(scorer, challenges, got)
        if isinstance(engine, CheatingEngine):
            # the challenges' decisions; the noise requests interleave with them, so match by request order
            decided = [cheated for rid, cheated in engine.decisions[before:] if rid.startswith("calib-")]
            flags[name] = decided[: len(challenges)]
        timings[name] = time.perf_counter() - t0
        mean = statistics.fmean(scores[name])
        print(f"{name:>18}: mean score {mean:.3f} ({timings[name]:.0f} s)", flush=True)

    try:
        bench_t0 = _challenges(BENCH_SEED, per_strategy, temperature=0.0, exclude=exclude)
        bench_t8 = _challenges(BENCH_SEED + 1, per_strategy, temperature=0.8, exclude=exclude)
        mixed = _challenges(BENCH_SEED + 2, per_strategy, exclude=exclude)  # the distribution's own temperature mix
        honest = TorchEngine.from_folder(folders["base"], _config())
        try:
            await run("honest-t0", honest, bench_t0)
            await run("honest-t0.8", honest, bench_t8)
        finally:
            await honest.close()
        for kind in VARIANT_KINDS:
            engine = TorchEngine.from_folder(folders[kind], _config())
            try:
                await run(kind, engine, mixed)
            finally:
                await engine.close()
        for mode in ("canned", "replay"):
            base = TorchEngine.from_folder(folders["base"], _config())
            cheat = CheatingEngine(
                base, CheatConfig(mode=mode, seed=11), tokenize=base.tokenize, detokenize=base.detokenize
            )
            try:
                await run(mode, cheat, mixed, warm_up=16 if mode == "replay" else 0)
            finally:
                await cheat.close()
        base = TorchEngine.from_folder(folders["base"], _config())
        sub = TorchEngine.from_folder(folders["int8"], _config())
        cheat = CheatingEngine(base, CheatConfig(mode="substitute", fraction=0.2, seed=13), substitute=sub)
        try:
            await run("fraction-0.2-int8", cheat, mixed)
        finally:
            await cheat.close()
    finally:
        await reference.close()
    return scores, {"timings_s": {k: round(v, 1) for k, v in timings.items()}, "cheated_flags": flags}


def _simulate(
    scores: Sequence[float], params: CusumParams, *, runs: int, epochs: int, committee: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Per run, the first epoch (1-based) whose committee median fails, or 0 if none within ``epochs``; and the
    same for a single verifier. Scores are drawn with replacement from ``scores`` (resampling, not a network run)."""
    pool = np.asarray(scores, dtype=np.float64)
    m = params.challenges_per_epoch
    stat = np.zeros((runs, committee))
    alarmed = np.zeros((runs, committee), dtype=bool)
    first = np.zeros(runs, dtype=np.int64)
    first_single = np.zeros(runs, dtype=np.int64)
    for epoch in range(1, epochs + 1):
        draws = rng.choice(pool, size=(m, runs, committee))
        for i in range(m):
            stat = np.maximum(0.0, stat + (1.0 - draws[i]) - params.kappa)
            alarmed |= stat >= params.threshold
        # epoch_score per verifier, vectorised exactly as verifier._sequential.epoch_score computes it
        raw = np.floor(1e6 * np.clip(1.0 - stat / (2.0 * params.threshold), 0.0, 1.0))
        attested = np.where(alarmed, np.minimum(raw, PASS_THRESHOLD - 1), np.maximum(raw, PASS_THRESHOLD))
        median = np.median(attested, axis=1)
        newly = (median < PASS_THRESHOLD) & (first == 0)
        first[newly] = epoch
        single = (attested[:, 0] < PASS_THRESHOLD) & (first_single == 0)
        first_single[single] = epoch
    return first, first_single


def _honest_false_slash(
    scores: Sequence[float],
    params: CusumParams,
    *,
    nodes: int,
    epochs: int,
    committee: int,
    rng: np.random.Generator,
    unseen: float = 0.0,
) -> dict[str, float]:
    """Honest nodes over many epochs, CUSUM state carried across epochs (reset after a slash, as after unjailing).

    ``unseen`` > 0 replaces that share of draws by a score of 0: the worst case the analytic bound assumes."""
    pool = np.asarray(scores, dtype=np.float64)
    m = params.challenges_per_epoch
    stat = np.zeros((nodes, committee))
    alarmed = np.zeros((nodes, committee), dtype=bool)
    counted = np.zeros(nodes, dtype=bool)
    slashes = 0
    single_alarms = 0
    for _ in range(epochs):
        draws = rng.choice(pool, size=(m, nodes, committee))
        if unseen > 0.0:
            draws = np.where(rng.random(draws.shape) < unseen, 0.0, draws)
        for i in range(m):
            stat = np.maximum(0.0, stat + (1.0 - draws[i]) - params.kappa)
            alarmed |= stat >= params.threshold
        failed = alarmed.sum(axis=1) * 2 > committee
        slashes += int(failed.sum())
        single_alarms += int((alarmed[:, 0] & ~counted).sum())  # new alarms of one verifier, whatever the others do
        counted |= alarmed[:, 0]
        stat[failed] = 0.0
        alarmed[failed] = False
        counted[failed] = False
    total = nodes * epochs
    upper = 1.0 - 0.05 ** (1.0 / total) if slashes == 0 else (slashes + 1.645 * math.sqrt(slashes)) / total
    return {
        "node_epochs": total,
        "false_slashes": slashes,
        "false_slash_rate": slashes / total,
        "false_slash_rate_upper95": upper,
        "single_verifier_false_alarms": single_alarms,
        "single_verifier_false_alarm_rate": single_alarms / total,
    }


def _roc(honest: Sequence[float], cheat: Sequence[float]) -> dict[str, Any]:
    """AUC (probability a cheated challenge scores below an honest one, ties half) and (threshold, FPR, TPR) points."""
    h = np.round(np.asarray(honest), 6)  # as stored in the results file, so a --resample run gives the same ROC
    c = np.round(np.asarray(cheat), 6)
    below = (c[:, None] < h[None, :]).mean() + 0.5 * (c[:, None] == h[None, :]).mean()
    points = []
    for t in (0.5, 0.7, 0.9, 0.99, 0.999):
        points.append({"threshold": t, "fpr": float((h < t).mean()), "tpr": float((c < t).mean())})
    return {"auc": float(below), "points": points}


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="use the quick model recipe")
    parser.add_argument("--calibration-challenges", type=int, default=800, help="honest challenges (--calibrate)")
    parser.add_argument("--challenges", type=int, default=200, help="measured challenges per strategy")
    parser.add_argument("--per-epoch", type=int, default=16, help="challenges per node per epoch per verifier")
    parser.add_argument("--committee", type=int, default=3)
    parser.add_argument("--runs", type=int, default=2000, help="resampled runs per strategy")
    parser.add_argument("--honest-epochs", type=int, default=200_000, help="simulated honest node-epochs")
    parser.add_argument("--user-rps", type=float, default=1.0, help="user requests per second per node (load)")
    parser.add_argument("--epoch-s", type=float, default=3600.0, help="epoch length in seconds")
    parser.add_argument("--calibrate", action="store_true", help="measure and write verifier/calibration.json first")
    parser.add_argument("--calibration", default="", help="calibration file to use (default: the shipped one)")
    parser.add_argument("--resample", default="", help="skip measuring: resample the scores of this results file")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    started = time.perf_counter()
    if args.resample:
        # Phase 3 only, on the per-challenge scores an earlier run measured and wrote.
        earlier = json.loads(Path(args.resample).read_text())
        scores = {name: list(row["scores"]) for name, row in earlier["strategies"].items()}
        extra = {
            "timings_s": {k: v for k, v in earlier["conditions"].items() if k in scores or k == "calibration"},
            "cheated_flags": {},
            "earlier": earlier["strategies"],
            "seconds": earlier["conditions"].get("seconds", 0.0),
            "load_average": earlier["conditions"].get("load_average"),
        }
        base = MODELS / earlier["model"]
        cal = Calibration.load(args.calibration) if args.calibration else Calibration.default()
    else:
        recipe = ModelRecipe.quick() if args.quick else ModelRecipe.default()
        base = ensure_model(recipe, MODELS, progress=print)
        folders = {"base": base}
        for kind in VARIANT_KINDS:
            folder = MODELS / f"{base.name}--{kind}"
            if not (folder / "planetserve.json").is_file():
                print(f"making variant {kind} ...", flush=True)
                build_variant(base, kind, folder, progress=print)
            folders[kind] = folder
        if args.calibrate:
            t0 = time.perf_counter()
            cal = asyncio.run(_calibrate(base, args.calibration_challenges))
            cal.save(SHIPPED)
            print(f"calibrated on {args.calibration_challenges} honest challenges in {time.perf_counter() - t0:.0f} s")
            print(f"wrote {SHIPPED}")
        else:
            cal = Calibration.load(args.calibration) if args.calibration else Calibration.default()
        scores, extra = asyncio.run(_measure(folders, cal, args.challenges))
    measure_s = time.perf_counter() - started
    tol = cal.tolerance()
    honest_cal = cal.honest()
    params = design_cusum(honest_cal, challenges_per_epoch=args.per_epoch)
    rng = np.random.default_rng(2026)
    honest_all = scores["honest-t0"] + scores["honest-t0.8"]
    strategies: dict[str, Any] = {}
    for name, got in scores.items():
        first, single = _simulate(got, params, runs=args.runs, epochs=EPOCHS, committee=args.committee, rng=rng)
        caught = first[first > 0]
        row: dict[str, Any] = {
            "challenges": len(got),
            "mean_score": statistics.fmean(got),
            "min_score": min(got),
            "p01_score": float(np.quantile(got, 0.01)),
            "detected_within_10_epochs": float((first > 0).mean()),
            "single_verifier_detected_within_10_epochs": float((single > 0).mean()),
            "epochs_to_detection_median": float(np.median(caught)) if caught.size else None,
            "epochs_to_detection_mean": float(caught.mean()) if caught.size else None,
            "epochs_to_detection_p99": float(np.quantile(caught, 0.99)) if caught.size else None,
        }
        if not name.startswith("honest"):
            row["roc_vs_honest"] = _roc(honest_all, got)
        row["scores"] = [round(x, 6) for x in got]
        for key in ("cheated_share", "mean_score_of_cheated"):
            if key in extra.get("earlier", {}).get(name, {}):
                row[key] = extra["earlier"][name][key]
        if name in extra["cheated_flags"]:
            flags = extra["cheated_flags"][name]
            row["cheated_share"] = sum(flags) / max(1, len(flags))
            cheated = [s for s, f in zip(got, flags, strict=False) if f]
            if cheated:
                row["mean_score_of_cheated"] = statistics.fmean(cheated)
        strategies[name] = row
    nodes = 1000
    false_slash = _honest_false_slash(
        honest_all, params, nodes=nodes, epochs=max(1, args.honest_epochs // nodes), committee=args.committee, rng=rng
    )
    stressed = _honest_false_slash(
        honest_all,
        params,
        nodes=nodes,
        epochs=max(1, args.honest_epochs // nodes),
        committee=args.committee,
        rng=rng,
        unseen=params.unseen_rate,
    )
    audits = args.per_epoch * args.committee
    users = args.user_rps * args.epoch_s
    traffic = {
        "audits_per_node_epoch": audits,
        "user_requests_per_node_epoch": users,
        "audit_fraction": audits / (audits + users),
        "conditions": f"{args.committee} verifiers x {args.per_epoch} challenges per node per epoch, "
        f"{args.user_rps} user requests/s per node, {args.epoch_s:.0f} s epochs",
    }
    honest_min = min(honest_all)
    result = {
        "note": "detection and false-slash rates RESAMPLE measured per-challenge scores; they are not network runs",
        "model": base.name,
        "calibration": {
            "challenges": len(honest_cal),
            "tolerance": tol.to_dict(),
            "honest_mean": statistics.fmean(honest_cal),
            "honest_min": min(honest_cal),
        },
        "cusum": params.to_dict(),
        "strategies": strategies,
        "honest_false_slash": false_slash,
        "honest_false_slash_with_unseen_failures": {
            **stressed,
            "detail": f"as above, with {params.unseen_rate:.2e} of draws replaced by a score of 0 (the bound's model)",
        },
        "honest_margin": {
            "min_honest_score": honest_min,
            "detail": "lowest measured honest per-challenge score (bench prompts, both temperatures)",
        },
        "traffic": traffic,
        "conditions": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average": extra.get("load_average", os.getloadavg()),
            "per_strategy_challenges": len(scores["honest-t0"]),
            "calibration_challenges": len(honest_cal),
            "resampled_from_an_earlier_measurement": bool(args.resample),
            "runs_per_strategy": args.runs,
            "committee": args.committee,
            "per_epoch": args.per_epoch,
            "seconds": extra.get("seconds", round(measure_s, 1)),
            **extra["timings_s"],
        },
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"\ntolerance {tol.logprob_abs:.2e} nats (honest max error {tol.measured_max_abs:.2e} over "
        f"{tol.measured_tokens} tokens); CUSUM kappa {params.kappa:.4f} h {params.threshold:.3f}, "
        f"false alarm bound {params.false_alarm_bound:.2e}/epoch/verifier"
    )
    print("detection rates below RESAMPLE measured per-challenge scores (not full network runs)")
    print(f"{'strategy':>18} {'n':>4} {'mean':>6} {'min':>6} {'AUC':>6} {'det<=10':>8} {'epochs':>6} {'p99':>5}")
    for name, row in strategies.items():
        auc = row.get("roc_vs_honest", {}).get("auc")
        ep = row["epochs_to_detection_median"]
        p99 = row["epochs_to_detection_p99"]
        print(
            f"{name:>18} {row['challenges']:>4} {row['mean_score']:>6.3f} {row['min_score']:>6.3f} "
            f"{'' if auc is None else f'{auc:.3f}':>6} {row['detected_within_10_epochs']:>8.4f} "
            f"{'-' if ep is None else f'{ep:.0f}':>6} {'-' if p99 is None else f'{p99:.0f}':>5}"
        )
    print(
        f"honest false slashes: {false_slash['false_slashes']} in {false_slash['node_epochs']} node-epochs "
        f"(95% upper {false_slash['false_slash_rate_upper95']:.1e}); audits {traffic['audit_fraction']:.2%} of traffic"
    )
    print(
        f"  with the bound's unseen failures ({params.unseen_rate:.1e} of challenges scoring 0): "
        f"{stressed['false_slashes']} false slashes, single-verifier false alarms "
        f"{stressed['single_verifier_false_alarm_rate']:.1e}/epoch (bound {params.false_alarm_bound:.0e})"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
