"""Quality of the project's model and its weaker variants: held-out arithmetic accuracy and perplexity.

Run ``python bench/quality.py`` (``--quick`` for the quick model). Builds (or reuses, keyed by recipe) the base model
under ``build/models`` and its four variants, evaluates each, prints a table and writes
``bench/results/quality.json``. Besides accuracy and perplexity it reports how far each variant's per-token log-probs
are from the base model's on held-out text (mean absolute difference), which is what a verifier actually sees.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from node.inference import ModelRecipe, TorchEngine, ensure_model, evaluate, make_variant
from node.inference._corpus import corpus_lines

RESULTS = Path(__file__).resolve().parent / "results" / "quality.json"
MODELS = Path(__file__).resolve().parents[1] / "build" / "models"
KINDS = ("fewer-layers", "int8", "undertrained", "seed")


async def _logprob_gap(base_dir: Path, other_dir: Path, texts: list[str]) -> float:
    base = TorchEngine.from_folder(base_dir)
    other = TorchEngine.from_folder(other_dir)
    try:
        diffs: list[float] = []
        for text in texts:
            a = await base.score("\n", text)
            b = await other.score("\n", text)
            diffs.extend(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True))
        return statistics.fmean(diffs)
    finally:
        await base.close()
        await other.close()


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="use the quick model recipe")
    parser.add_argument("--problems", type=int, default=200)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    recipe = ModelRecipe.quick() if args.quick else ModelRecipe.default()
    started = time.perf_counter()
    base = ensure_model(recipe, MODELS, progress=print)
    folders = {"base": base}
    for kind in KINDS:
        folder = MODELS / f"{base.name}--{kind}"
        if not (folder / "planetserve.json").is_file():
            print(f"making variant {kind} ...")
            make_variant(base, kind, folder, progress=print)
        folders[kind] = folder
    texts = [" ".join(corpus_lines(777 + i, 12, held_out=True)) for i in range(8)]
    rows: list[dict[str, Any]] = []
    for kind, folder in folders.items():
        result = dataclasses.asdict(evaluate(folder, n_problems=args.problems))
        result["logprob_gap_vs_base"] = 0.0 if kind == "base" else asyncio.run(_logprob_gap(base, folder, texts))
        rows.append(result)
    report = {
        "bench": "quality",
        "recipe": recipe.to_dict(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "models": rows,
        "seconds": time.perf_counter() - started,
    }
    head = f"{'model':24} {'kind':13} {'params':>9} {'arith acc':>9} {'arith MAE':>9} {'ppl':>7} {'|dlogp|':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['name']:24} {r['kind']:13} {r['parameters']:>9} {r['arithmetic_accuracy']:>9.3f} "
            f"{r['arithmetic_mae']:>9.2f} {r['perplexity']:>7.3f} {r['logprob_gap_vs_base']:>8.4f}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
