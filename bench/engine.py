"""Torch-engine benchmark: tokens/s, time to first token and per-token latency, with and without prefix reuse.

Run ``python bench/engine.py`` (``--quick`` for the small model and fewer requests). Prints a table and writes
``bench/results/engine.json``.

Workload: prompts of ``--prompt-tokens`` tokens (default 1024) of procedural corpus text, of which the first 80%
are one shared prefix and the rest a per-request suffix; greedy decoding of ``--gen-tokens`` tokens. For each
concurrency (1, 4, 16) the same requests run twice, side by side, on two engines loaded from the same folder: one
with the prefix KV cache and one without (``prefix_cache_bytes=0``). Both are warmed up with one request carrying
the shared prefix, so the cached engine starts with the prefix in cache, as a node that has served it before would.

Target (issue 3): prefix reuse cuts the median time to first token by at least 2x on prompts sharing 80% of tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from node.inference import (
    EngineConfig,
    GenerationRequest,
    ModelRecipe,
    SamplingParams,
    TorchEngine,
    ensure_model,
)
from node.inference._corpus import corpus_lines

RESULTS = Path(__file__).resolve().parent / "results" / "engine.json"
MODELS = Path(__file__).resolve().parents[1] / "build" / "models"


def _prompts(engine: TorchEngine, n: int, prompt_tokens: int, shared_fraction: float) -> list[tuple[int, ...]]:
    stream = engine.tokenize("\n".join(corpus_lines(4242, 4000)))
    shared_len = int(prompt_tokens * shared_fraction)
    suffix_len = prompt_tokens - shared_len
    shared = stream[:shared_len]
    out = []
    for i in range(n):
        start = shared_len + 997 * (i + 1)
        out.append(tuple(shared + stream[start : start + suffix_len]))
    return out


async def _one(engine: TorchEngine, rid: str, prompt: tuple[int, ...], gen_tokens: int) -> dict[str, float]:
    started = time.perf_counter()
    first = last = started
    tokens = 0
    cached = 0
    request = GenerationRequest(
        request_id=rid, prompt=prompt, params=SamplingParams(max_tokens=gen_tokens, temperature=0)
    )
    async for chunk in engine.generate(request):
        now = time.perf_counter()
        if tokens == 0 and chunk.token_ids:
            first = now
        tokens += len(chunk.token_ids)
        last = now
        cached = chunk.cached_tokens
    return {
        "ttft_s": first - started,
        "per_token_s": (last - first) / max(tokens - 1, 1),
        "tokens": float(tokens),
        "cached_tokens": float(cached),
        "latency_s": last - started,
    }


_METRICS = (
    "ttft_ms_median",
    "ttft_ms_p90",
    "per_token_ms_median",
    "latency_ms_median",
    "tokens_per_s",
    "cached_tokens_median",
    "wall_s",
)


def _nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def _run(
    engine: TorchEngine, prompts: list[tuple[int, ...]], concurrency: int, gen_tokens: int, tag: str
) -> dict[str, Any]:
    sem = asyncio.Semaphore(concurrency)

    async def limited(i: int, prompt: tuple[int, ...]) -> dict[str, float]:
        async with sem:
            return await _one(engine, f"{tag}-{concurrency}-{i}", prompt, gen_tokens)

    started = time.perf_counter()
    rows = await asyncio.gather(*(limited(i, p) for i, p in enumerate(prompts)))
    wall = time.perf_counter() - started
    total_tokens = sum(r["tokens"] for r in rows)
    return {
        "requests": len(rows),
        "ttft_ms_median": 1000 * statistics.median(r["ttft_s"] for r in rows),
        "ttft_ms_p90": 1000 * _nearest_rank([r["ttft_s"] for r in rows], 0.9),
        "per_token_ms_median": 1000 * statistics.median(r["per_token_s"] for r in rows),
        "latency_ms_median": 1000 * statistics.median(r["latency_s"] for r in rows),
        "tokens_per_s": total_tokens / wall,
        "cached_tokens_median": statistics.median(r["cached_tokens"] for r in rows),
        "wall_s": wall,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    recipe = ModelRecipe.quick() if args.quick else ModelRecipe.default()
    folder = Path(args.model) if args.model else ensure_model(recipe, MODELS, progress=print)
    common = {"device": args.device, "max_queue": 64, "max_running": 16}
    engines = {
        "reuse": TorchEngine.from_folder(folder, EngineConfig(**common)),
        "no_reuse": TorchEngine.from_folder(folder, EngineConfig(**common, prefix_cache_bytes=0)),
    }
    try:
        probe = engines["reuse"]
        n_prompts = max(args.concurrency) * args.rounds
        prompts = _prompts(probe, n_prompts + 1, args.prompt_tokens, args.shared)
        warm = prompts.pop()
        for name, engine in engines.items():
            await _one(engine, f"warm-{name}", warm, 2)
        runs: list[dict[str, Any]] = []
        for rep in range(args.repeats):
            for conc in args.concurrency:
                batch = prompts[: conc * args.rounds]
                order = list(engines.items())
                if rep % 2:
                    order.reverse()  # alternate which mode goes first, so drift in machine load cancels out
                for name, engine in order:  # side by side: same prompts, one after the other
                    result = await _run(engine, batch, conc, args.gen_tokens, name)
                    runs.append({"mode": name, "concurrency": conc, "repeat": rep, **result})
                    # Keep only the shared prefix cached, so every run starts in the same state.
                    if name == "reuse":
                        engine.clear_prefix_cache()
                        await _one(engine, f"rewarm-{rep}-{conc}", warm, 1)
        summary = []
        for conc in args.concurrency:
            for name in engines:
                cell = [r for r in runs if r["concurrency"] == conc and r["mode"] == name]
                summary.append(
                    {
                        "mode": name,
                        "concurrency": conc,
                        **{key: statistics.median(r[key] for r in cell) for key in _METRICS},
                    }
                )
        ratios = {}
        per_repeat: dict[str, list[float]] = {}
        for conc in args.concurrency:
            by_mode = {r["mode"]: r for r in summary if r["concurrency"] == conc}
            ratios[str(conc)] = by_mode["no_reuse"]["ttft_ms_median"] / by_mode["reuse"]["ttft_ms_median"]
            per_repeat[str(conc)] = [
                next(r for r in runs if r["concurrency"] == conc and r["repeat"] == rep and r["mode"] == "no_reuse")[
                    "ttft_ms_median"
                ]
                / next(r for r in runs if r["concurrency"] == conc and r["repeat"] == rep and r["mode"] == "reuse")[
                    "ttft_ms_median"
                ]
                for rep in range(args.repeats)
            ]
        import torch

        return {
            "bench": "engine",
            "model": probe.model_id,
            "model_dir": folder.name,
            "device": str(next(probe._model.parameters()).device),
            "torch_threads": torch.get_num_threads(),
            "machine": f"{platform.machine()} {os.cpu_count()} cpus",
            "prompt_tokens": args.prompt_tokens,
            "shared_fraction": args.shared,
            "gen_tokens": args.gen_tokens,
            "repeats": args.repeats,
            "requests_per_run": {str(c): c * args.rounds for c in args.concurrency},
            "summary": summary,
            "runs": runs,
            "ttft_speedup_reuse": ratios,
            "ttft_speedup_reuse_per_repeat": per_repeat,
            "target": "reuse cuts median TTFT >= 2x at 80% shared tokens",
            "target_met": all(v >= 2.0 for v in ratios.values()),
        }
    finally:
        for engine in engines.values():
            await engine.close()


def _table(result: dict[str, Any]) -> str:
    head = f"{'mode':9} {'conc':>4} {'TTFT ms':>9} {'p90 ms':>8} {'tok ms':>7} {'tok/s':>7} {'cached':>7} {'wall s':>7}"
    lines = [head, "-" * len(head)]
    for r in result["summary"]:
        lines.append(
            f"{r['mode']:9} {r['concurrency']:>4} {r['ttft_ms_median']:>9.1f} {r['ttft_ms_p90']:>8.1f} "
            f"{r['per_token_ms_median']:>7.2f} {r['tokens_per_s']:>7.1f} {r['cached_tokens_median']:>7.0f} "
            f"{r['wall_s']:>7.2f}"
        )
    lines.append(
        f"TTFT speed-up from prefix reuse (median of {result['repeats']} repeats, no_reuse / reuse): "
        + ", ".join(f"c={k}: {v:.2f}x" for k, v in result["ttft_speedup_reuse"].items())
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, one round")
    parser.add_argument("--model", help="model folder (default: build the default project model)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--shared", type=float, default=0.8)
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4, help="requests per concurrency slot")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=3, help="repeat the sweep; the table shows medians")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if args.quick:
        args.rounds = 1
        args.repeats = 1
    result = asyncio.run(main_async(args))
    print(_table(result))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
