"""Quality of the project's model and of the cheaper models a dishonest node might serve instead.

Run ``python bench/quality.py`` (``--quick`` for the quick recipe). Builds (or reuses, keyed by recipe) the base model
under ``build/models`` and its variants (fewer-layers, half-width, int8, undertrained, seed), then reports per model:

- held-out addition exact match, held-out text perplexity, and the fraction of 100 held-out prompts whose greedy
  continuation is unique (``distinct_continuations``: a model that ignores its prompt scores ~0);
- size on disk (``model.safetensors``) and generate speed (one greedy stream through the torch engine, tokens/s);
- what a verifier sees: on the base model's own greedy answers to held-out prompts, the mean per-token log-prob gap
  ``logp_base - logp_variant`` (teacher-forced ``score`` on each engine; signed and absolute), how often the variant's
  16-token greedy continuation is token-for-token the base's (``greedy_agreement``, what seeded replay compares) and
  how often its first line, the answer, is (``answer_agreement``).

Writes ``bench/results/quality.json`` and says which variants are hard to tell from the base (mean absolute gap below
``HARD_GAP`` nats per token and answer agreement of at least ``HARD_AGREEMENT``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any

from node.inference import GenerationRequest, ModelRecipe, SamplingParams, TorchEngine, ensure_model, evaluate
from node.inference import make_variant as build_variant
from node.inference._corpus import held_out_prompts
from node.inference._training import VARIANT_KINDS

RESULTS = Path(__file__).resolve().parent / "results" / "quality.json"
MODELS = Path(__file__).resolve().parents[1] / "build" / "models"
#: Below this mean per-token log-prob gap (nats) a variant is "hard to tell" by likelihood alone.
HARD_GAP = 0.05
#: At or above this greedy agreement with the base a variant is "hard to tell" by replay alone.
HARD_AGREEMENT = 0.9
#: Greedy tokens per answer the verifier signal is measured on.
ANSWER_TOKENS = 16


async def _greedy(engine: TorchEngine, prompt: str, rid: str, max_tokens: int) -> tuple[list[int], list[float]]:
    ids: list[int] = []
    logprobs: list[float] = []
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    async for chunk in engine.generate(GenerationRequest(request_id=rid, prompt=prompt, params=params)):
        ids.extend(chunk.token_ids)
        logprobs.extend(chunk.logprobs)
    return ids, logprobs


async def _speed(engine: TorchEngine, tokens: int = 64, runs: int = 3) -> float:
    """Tokens per second of one greedy stream (after a warm-up run)."""
    await _greedy(engine, "\nthe color of", "warm", 8)
    rates = []
    for i in range(runs):
        started = time.perf_counter()
        ids, _ = await _greedy(engine, f"\necho ka lo mi {i} :", f"speed{i}", tokens)
        rates.append(len(ids) / (time.perf_counter() - started))
    return statistics.median(rates)


async def _verifier_view(base: TorchEngine, other: TorchEngine, prompts: list[str]) -> dict[str, float]:
    """On the base's greedy answers: mean and mean absolute per-token ``logp_base - logp_other``; the fraction of
    prompts where the other's greedy continuation is token-for-token the base's, and where its first line is."""
    gaps: list[float] = []
    same = same_line = 0
    for i, prompt in enumerate(prompts):
        ids, base_logprobs = await _greedy(base, prompt, f"b{i}", ANSWER_TOKENS)
        other_ids, _ = await _greedy(other, prompt, f"o{i}", ANSWER_TOKENS)
        same += other_ids == ids
        same_line += base.detokenize(ids).split("\n")[0] == base.detokenize(other_ids).split("\n")[0]
        scored = await other.score(prompt, ids)
        gaps.extend(b - o for b, o in zip(base_logprobs, scored.logprobs, strict=True))
    return {
        "logprob_gap_vs_base": statistics.fmean(gaps),
        "abs_logprob_gap_vs_base": statistics.fmean(abs(g) for g in gaps),
        "greedy_agreement": same / len(prompts),
        "answer_agreement": same_line / len(prompts),
    }


async def _engine_rows(folders: dict[str, Path], prompts: list[str]) -> dict[str, dict[str, float]]:
    base = TorchEngine.from_folder(folders["base"])
    rows: dict[str, dict[str, float]] = {}
    try:
        for kind, folder in folders.items():
            other = base if kind == "base" else TorchEngine.from_folder(folder)
            try:
                same = {"logprob_gap_vs_base": 0.0, "abs_logprob_gap_vs_base": 0.0}
                same |= {"greedy_agreement": 1.0, "answer_agreement": 1.0}
                view = same if kind == "base" else await _verifier_view(base, other, prompts)
                rows[kind] = {"tokens_per_second": await _speed(other), **view}
            finally:
                if other is not base:
                    await other.close()
    finally:
        await base.close()
    return rows


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="use the quick model recipe")
    parser.add_argument("--problems", type=int, default=100)
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    recipe = ModelRecipe.quick() if args.quick else ModelRecipe.default()
    started = time.perf_counter()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    base = ensure_model(recipe, MODELS, progress=print)
    train_wall = time.perf_counter() - started
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    folders = {"base": base}
    build_seconds: dict[str, float] = {}
    for kind in VARIANT_KINDS:
        folder = MODELS / f"{base.name}--{kind}"
        if not (folder / "planetserve.json").is_file():
            print(f"making variant {kind} ...")
            t = time.perf_counter()
            build_variant(base, kind, folder, progress=print)
            build_seconds[kind] = time.perf_counter() - t
        folders[kind] = folder
    prompts = [p for p, _ in held_out_prompts(40, seed=9_999)]
    engine_rows = asyncio.run(_engine_rows(folders, prompts))
    rows: list[dict[str, Any]] = []
    for kind, folder in folders.items():
        result = dataclasses.asdict(evaluate(folder, n_problems=args.problems, n_prompts=args.prompts))
        result["size_bytes"] = (folder / "model.safetensors").stat().st_size
        result.update(engine_rows[kind])
        result["hard_to_tell"] = kind != "base" and (
            result["abs_logprob_gap_vs_base"] < HARD_GAP and result["answer_agreement"] >= HARD_AGREEMENT
        )
        rows.append(result)
    hard = [str(r["kind"]) for r in rows if r["hard_to_tell"]]
    report = {
        "bench": "quality",
        "recipe": recipe.to_dict(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "default"),
        "load_average_1m_at_end": os.getloadavg()[0],
        # Only meaningful when this run trained the base (0 when it was cached).
        "base_training_wall_seconds": round(train_wall, 1),
        "base_training_cpu_seconds": round(cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime, 1),
        "variant_build_seconds": {k: round(v, 1) for k, v in build_seconds.items()},
        "thresholds": {"hard_gap_nats": HARD_GAP, "hard_agreement": HARD_AGREEMENT},
        "models": rows,
        "hard_to_tell": hard,
        "seconds": round(time.perf_counter() - started, 1),
    }
    head = (
        f"{'kind':13} {'params':>9} {'MB':>6} {'add':>5} {'distinct':>8} {'ppl':>7} {'tok/s':>7} "
        f"{'gap':>7} {'|gap|':>7} {'agree':>6} {'answer':>6} hard"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['kind']:13} {r['parameters']:>9} {r['size_bytes'] / 1e6:>6.2f} {r['arithmetic_accuracy']:>5.2f} "
            f"{r['distinct_continuations']:>8.2f} {r['perplexity']:>7.3f} {r['tokens_per_second']:>7.1f} "
            f"{r['logprob_gap_vs_base']:>7.4f} {r['abs_logprob_gap_vs_base']:>7.4f} {r['greedy_agreement']:>6.2f} "
            f"{r['answer_agreement']:>6.2f} {'yes' if r['hard_to_tell'] else ''}"
        )
    print(f"hard to tell from the base: {', '.join(hard) or 'none'}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
