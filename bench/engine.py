"""Torch-engine benchmark: the token-budget scheduler and block cache against the previous engine, batched decode
against plain transformers, and (``--sections reuse``) prefix reuse on and off.

Run ``python bench/engine.py`` (the ``--quick`` project model unless ``--model``). Prints tables and writes
``bench/results/engine.json``. Sections (``--sections``, default ``burst batched``):

* ``burst`` — the previous engine (git revision ``LEGACY_REV``: prefill-first, whole prompts one at a time, a
  per-prompt KV copy cache; loaded from a temporary copy of that revision's two modules) and the current one, side
  by side on the same folder, each on the same bursty mix: ``--burst-long`` long prompts (``--long-tokens`` tokens,
  of which ``--shared`` are one shared prefix) arrive at once, and ``--burst-short`` short prompts (about 24 tokens)
  arrive every 20 ms starting 10 ms later; every request decodes ``--gen-tokens`` greedy tokens. Reported: the short
  prompts' TTFT p50/p99, decode tokens/s over the run, and prefix-cache bytes per distinct cached prompt token
  afterwards (the current engine also reports cached rows vs distinct 16-token blocks).
* ``batched`` — ``--concurrency`` (16) requests of short prompts decoding ``--decode-tokens`` tokens at once on the
  current engine, against plain ``model.generate`` (greedy, KV cache on) on the same prompts one request at a time.
* ``reuse`` — the earlier sweep (issue 3): TTFT with and without prefix reuse at concurrency 1/4/16.

Targets (issue 13): short-prompt TTFT p99 at least 3x lower under the burst; cached rows equal distinct blocks;
batched throughput at least 4x the sequential baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from node.inference import (
    CHUNK_TOKENS,
    EngineConfig,
    GenerationRequest,
    ModelRecipe,
    SamplingParams,
    TorchEngine,
    chunk_hashes,
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


async def _reuse_section(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    common = {"device": args.device, "max_queue": 64, "max_running": 16}
    engines = {
        "reuse": TorchEngine.from_folder(folder, EngineConfig(**common)),
        "no_reuse": TorchEngine.from_folder(folder, EngineConfig(**common, prefix_cache_bytes=0)),
    }
    try:
        probe = engines["reuse"]
        n_prompts = max(args.reuse_concurrency) * args.rounds
        prompts = _prompts(probe, n_prompts + 1, args.prompt_tokens, args.shared)
        warm = prompts.pop()
        for name, engine in engines.items():
            await _one(engine, f"warm-{name}", warm, 2)
        runs: list[dict[str, Any]] = []
        for rep in range(args.repeats):
            for conc in args.reuse_concurrency:
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
        for conc in args.reuse_concurrency:
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
        for conc in args.reuse_concurrency:
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
        return {
            "prompt_tokens": args.prompt_tokens,
            "shared_fraction": args.shared,
            "gen_tokens": args.gen_tokens,
            "repeats": args.repeats,
            "requests_per_run": {str(c): c * args.rounds for c in args.reuse_concurrency},
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


def _reuse_table(result: dict[str, Any]) -> str:
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


# --------------------------------------------------------------------------------------------- old vs new engine
#: The last revision with the previous scheduler and cache (before issue 13), loaded for the side-by-side runs.
LEGACY_REV = "18501c1"


def _legacy_engine() -> Any:
    """The previous ``TorchEngine`` module, from ``git show LEGACY_REV:...`` into a temporary directory."""
    root = Path(__file__).resolve().parents[1]
    tmp = Path(tempfile.mkdtemp(prefix="ps-legacy-engine-"))
    for name in ("_torch_engine", "_kvcache"):
        source = subprocess.run(
            ["git", "show", f"{LEGACY_REV}:node/inference/{name}.py"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
        source = source.replace("from node.inference._kvcache import", "from ps_legacy_kvcache import")
        (tmp / f"ps_legacy{name}.py").write_text(source)
    sys.path.insert(0, str(tmp))
    return importlib.import_module("ps_legacy_torch_engine")


def _short_prompts(engine: Any, n: int) -> list[tuple[int, ...]]:
    return [tuple(engine.tokenize(f"{i}+{i + 7}={2 * i + 7}\nthe red cat sees")) for i in range(n)]


async def _timed(engine: Any, rid: str, prompt: tuple[int, ...], gen: int, delay: float) -> dict[str, float]:
    await asyncio.sleep(delay)
    started = time.perf_counter()
    first = 0.0
    tokens = 0
    request = GenerationRequest(request_id=rid, prompt=prompt, params=SamplingParams(max_tokens=gen, temperature=0))
    async for chunk in engine.generate(request):
        if tokens == 0 and chunk.token_ids:
            first = time.perf_counter() - started
        tokens += len(chunk.token_ids)
    return {"ttft_s": first, "tokens": float(tokens), "end": time.perf_counter()}


async def _burst_once(
    engine: Any, longs: list[tuple[int, ...]], shorts: list[tuple[int, ...]], gen: int, tag: str
) -> dict[str, Any]:
    started = time.perf_counter()
    jobs = [_timed(engine, f"{tag}-l{i}", p, gen, 0.0) for i, p in enumerate(longs)]
    jobs += [_timed(engine, f"{tag}-s{i}", p, gen, 0.010 + 0.020 * i) for i, p in enumerate(shorts)]
    rows = await asyncio.gather(*jobs)
    wall = max(r["end"] for r in rows) - started
    short_ttft = [r["ttft_s"] for r in rows[len(longs) :]]
    long_ttft = [r["ttft_s"] for r in rows[: len(longs)]]
    return {
        "short_ttft_ms_p50": 1000 * statistics.median(short_ttft),
        "short_ttft_ms_p99": 1000 * _nearest_rank(short_ttft, 0.99),
        "long_ttft_ms_p50": 1000 * statistics.median(long_ttft),
        "decode_tokens_per_s": sum(r["tokens"] for r in rows) / wall,
        "wall_s": wall,
    }


async def _burst_section(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    legacy = _legacy_engine()
    common = {"device": args.device, "max_queue": 64, "max_running": 16}
    engines: dict[str, Any] = {
        "old": legacy.TorchEngine.from_folder(folder, legacy.EngineConfig(**common)),
        "new": TorchEngine.from_folder(folder, EngineConfig(**common)),
    }
    try:
        new = engines["new"]
        stream = new.tokenize("\n".join(corpus_lines(4242, 6000)))
        shared_len = int(args.long_tokens * args.shared)
        suffix = args.long_tokens - shared_len
        offsets = [shared_len + 1009 * (i + 1) for i in range(args.burst_long)]
        longs = [tuple(stream[:shared_len] + stream[o : o + suffix]) for o in offsets]
        shorts = _short_prompts(new, args.burst_short)
        for name, engine in engines.items():  # warm up kernels and allocators, then start from an empty cache
            await _timed(engine, f"warm-{name}", shorts[0], 2, 0.0)
            engine.clear_prefix_cache()
        runs: list[dict[str, Any]] = []
        for rep in range(args.burst_repeats):
            order = list(engines.items()) if rep % 2 == 0 else list(reversed(engines.items()))
            for name, engine in order:
                result = await _burst_once(engine, longs, shorts, args.gen_tokens, f"{name}{rep}")
                stats = engine.stats()
                distinct = {h for p in longs + shorts for h in chunk_hashes(list(p))}
                cached = set(stats.cached_prefix_hashes)
                result.update(
                    mode=name,
                    repeat=rep,
                    cache_bytes=stats.cache_bytes,
                    distinct_prompt_blocks=len(distinct),
                    # Bytes held per distinct token the cache can serve (its advertised hashes x 16): one KV row's
                    # size when every block is stored once, more when prefixes are stored as copies.
                    cache_bytes_per_distinct_prompt_token=stats.cache_bytes / max(1, len(cached) * CHUNK_TOKENS),
                    prompt_blocks_cached=len(distinct & cached),
                )
                if name == "new":
                    result["cached_rows"] = stats.cache_bytes // new.kv_block_bytes
                    result["cached_blocks_distinct"] = len(cached)
                    result["bytes_per_token_row"] = new.kv_block_bytes / CHUNK_TOKENS
                runs.append(result)
                engine.clear_prefix_cache()
        keys = (
            "short_ttft_ms_p50",
            "short_ttft_ms_p99",
            "long_ttft_ms_p50",
            "decode_tokens_per_s",
            "wall_s",
            "cache_bytes_per_distinct_prompt_token",
        )
        summary = {
            name: {k: statistics.median(r[k] for r in runs if r["mode"] == name) for k in keys} for name in engines
        }
        ratio = summary["old"]["short_ttft_ms_p99"] / summary["new"]["short_ttft_ms_p99"]
        rows_equal = all(r["cached_rows"] == r["cached_blocks_distinct"] for r in runs if r["mode"] == "new")
        return {
            "legacy_revision": LEGACY_REV,
            "long_prompts": args.burst_long,
            "long_tokens": args.long_tokens,
            "shared_fraction": args.shared,
            "short_prompts": args.burst_short,
            "short_tokens": len(shorts[0]),
            "gen_tokens": args.gen_tokens,
            "max_batch_tokens": EngineConfig().max_batch_tokens,
            "repeats": args.burst_repeats,
            "summary": summary,
            "runs": runs,
            "short_ttft_p99_speedup": ratio,
            "cached_rows_equal_distinct_blocks": rows_equal,
            "target": "short TTFT p99 >= 3x lower; cached rows == distinct blocks",
            "target_met": ratio >= 3.0 and rows_equal,
        }
    finally:
        for engine in engines.values():
            await engine.close()


async def _batched_section(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    import torch

    engine = TorchEngine.from_folder(
        folder, EngineConfig(device=args.device, max_queue=64, max_running=args.concurrency)
    )
    try:
        prompts = _short_prompts(engine, args.concurrency)
        await _timed(engine, "warm", prompts[0], 4, 0.0)
        started = time.perf_counter()
        rows = await asyncio.gather(
            *(_timed(engine, f"b{i}", p, args.decode_tokens, 0.0) for i, p in enumerate(prompts))
        )
        wall = time.perf_counter() - started
        batched_tps = sum(r["tokens"] for r in rows) / wall
        model: Any = engine._model  # plain transformers, the baseline
        device = next(model.parameters()).device
        tokens = 0
        with torch.inference_mode():
            model.generate(torch.tensor([list(prompts[0])], device=device), max_new_tokens=4, do_sample=False)
            started = time.perf_counter()
            for p in prompts:
                out = model.generate(
                    torch.tensor([list(p)], device=device),
                    attention_mask=torch.ones(1, len(p), dtype=torch.long, device=device),
                    max_new_tokens=args.decode_tokens,
                    min_new_tokens=args.decode_tokens,
                    do_sample=False,
                    pad_token_id=0,
                )
                tokens += int(out.shape[1]) - len(p)
            sequential_s = time.perf_counter() - started
        sequential_tps = tokens / sequential_s
        return {
            "concurrency": args.concurrency,
            "decode_tokens": args.decode_tokens,
            "engine_tokens_per_s": batched_tps,
            "engine_tokens": sum(r["tokens"] for r in rows),
            "hf_generate_sequential_tokens_per_s": sequential_tps,
            "speedup": batched_tps / sequential_tps,
            "target": "batched >= 4x sequential transformers generate",
            "target_met": batched_tps / sequential_tps >= 4.0,
        }
    finally:
        await engine.close()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if args.model:
        folder = Path(args.model)
    else:
        recipe = ModelRecipe.default() if args.full else ModelRecipe.quick()
        folder = ensure_model(recipe, MODELS, progress=print)
    started = time.time()
    result: dict[str, Any] = {
        "bench": "engine",
        "model_dir": folder.name,
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "load_average_at_start": os.getloadavg()[0],
    }
    if "burst" in args.sections:
        result["burst"] = await _burst_section(args, folder)
    if "batched" in args.sections:
        result["batched"] = await _batched_section(args, folder)
    if "reuse" in args.sections:
        result["reuse"] = await _reuse_section(args, folder)
    result["load_average_at_end"] = os.getloadavg()[0]
    result["seconds"] = time.time() - started
    return result


def _burst_table(b: dict[str, Any]) -> str:
    head = f"{'engine':6} {'short TTFT p50':>15} {'p99 ms':>9} {'long TTFT p50':>14} {'tok/s':>8} {'cache B/token':>14}"
    lines = [head, "-" * len(head)]
    for name, r in b["summary"].items():
        lines.append(
            f"{name:6} {r['short_ttft_ms_p50']:>15.1f} {r['short_ttft_ms_p99']:>9.1f} {r['long_ttft_ms_p50']:>14.1f} "
            f"{r['decode_tokens_per_s']:>8.1f} {r['cache_bytes_per_distinct_prompt_token']:>14.1f}"
        )
    lines.append(
        f"short TTFT p99: {b['short_ttft_p99_speedup']:.2f}x lower with the new scheduler; cached rows == distinct "
        f"blocks: {b['cached_rows_equal_distinct_blocks']} (old engine = git {b['legacy_revision']})"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the default project model instead of the quick one")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--model", help="model folder (default: build the quick project model)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sections", nargs="+", default=["burst", "batched"], choices=["burst", "batched", "reuse"])
    parser.add_argument("--burst-long", type=int, default=6)
    parser.add_argument("--long-tokens", type=int, default=1536)
    parser.add_argument("--burst-short", type=int, default=8)
    parser.add_argument("--burst-repeats", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--shared", type=float, default=0.8)
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4, help="reuse: requests per concurrency slot")
    parser.add_argument("--reuse-concurrency", dest="reuse_concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=3, help="reuse: repeat the sweep; the table shows medians")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if args.quick:
        args.rounds = 1
        args.repeats = 1
        args.burst_repeats = 1
    result = asyncio.run(main_async(args))
    if "burst" in result:
        print(_burst_table(result["burst"]))
    if "batched" in result:
        b = result["batched"]
        print(
            f"batched decode, concurrency {b['concurrency']}: engine {b['engine_tokens_per_s']:.1f} tok/s vs "
            f"transformers generate one at a time {b['hf_generate_sequential_tokens_per_s']:.1f} tok/s "
            f"= {b['speedup']:.2f}x"
        )
    if "reuse" in result:
        print(_reuse_table(result["reuse"]))
    print(f"load average {result['load_average_at_start']:.1f} -> {result['load_average_at_end']:.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
