"""Prepared GPU check for the torch engine: CUDA correctness against CPU, then throughput. Under 5 minutes.

Run ``python scripts/gpu_check.py [--model DIR] [--out FILE]`` wherever a CUDA GPU is. It

1. builds (or loads) the ``--quick`` project model — nothing is downloaded;
2. runs the same greedy requests on a CPU engine and a CUDA engine (fp32, TF32 off) and compares token ids, the
   per-token log-probs (max |Δ| must stay under ``--tolerance``), ``score`` results, and a warm-cache + chunked-prefill
   run on CUDA against a cold whole-prefill one;
3. measures CUDA decode throughput at concurrency 1 and 16 and TTFT of a long prompt.

It prints one JSON report on stdout (and to ``--out``); progress goes to stderr. Exit status: 0 when every check
passed, 1 when one failed. Without CUDA it says so plainly, runs the same comparison CPU against CPU (so its logic is
exercised), and exits 0: that run proves nothing about a GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from node.inference import (
    EngineConfig,
    GenerationChunk,
    GenerationRequest,
    ModelRecipe,
    SamplingParams,
    TorchEngine,
    ensure_model,
)

MODELS = Path(__file__).resolve().parents[1] / "build" / "models"
PROMPTS = [
    "3+4=",
    "the red cat sees the dog.\n12+7=19\nthe color of kalo is",
    "\n".join(f"{i}+{i + 3}={2 * i + 3}" for i in range(60)) + "\nthe small bird",
]
#: Wall-clock bound of the whole script, seconds.
DEADLINE_S = 290.0


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def _run(engine: TorchEngine, rid: str, prompt: str, max_tokens: int) -> list[GenerationChunk]:
    request = GenerationRequest(
        request_id=rid, prompt=prompt, params=SamplingParams(max_tokens=max_tokens, temperature=0)
    )
    return [chunk async for chunk in engine.generate(request)]


def _ids(chunks: list[GenerationChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def _lps(chunks: list[GenerationChunk]) -> list[float]:
    return [lp for c in chunks for lp in c.logprobs]


def _compare(a: list[GenerationChunk], b: list[GenerationChunk]) -> dict[str, Any]:
    """Token agreement up to the first divergence, and the largest log-prob gap over the agreeing prefix."""
    ia, ib = _ids(a), _ids(b)
    same = 0
    while same < min(len(ia), len(ib)) and ia[same] == ib[same]:
        same += 1
    gaps = [abs(x - y) for x, y in zip(_lps(a)[:same], _lps(b)[:same], strict=True)]
    return {
        "tokens": len(ia),
        "agreeing_prefix": same,
        "identical": ia == ib,
        "max_logprob_gap": max(gaps, default=0.0),
    }


async def _correctness(reference: TorchEngine, device: TorchEngine, tolerance: float) -> dict[str, Any]:
    rows = []
    for i, prompt in enumerate(PROMPTS):
        a = await _run(reference, f"r{i}", prompt, 32)
        b = await _run(device, f"d{i}", prompt, 32)
        row = _compare(a, b)
        score_a = await reference.score(prompt, _ids(a))
        score_b = await device.score(prompt, _ids(a))
        row["max_score_gap"] = max(abs(x - y) for x, y in zip(score_a.logprobs, score_b.logprobs, strict=True))
        rows.append(row)
    # Warm prefix cache + chunked prefill on the device against its own cold, whole-prompt answer.
    device.clear_prefix_cache()
    cold = await _run(device, "cold", PROMPTS[2], 16)
    warm = await _run(device, "warm", PROMPTS[2], 16)
    cached = _compare(cold, warm)
    cached["cached_tokens"] = warm[-1].cached_tokens
    ok = all(r["max_logprob_gap"] <= tolerance and r["max_score_gap"] <= tolerance for r in rows)
    ok = ok and all(r["agreeing_prefix"] >= min(8, r["tokens"]) for r in rows)
    ok = ok and cached["identical"] and cached["max_logprob_gap"] <= tolerance and cached["cached_tokens"] > 0
    return {"prompts": rows, "warm_vs_cold": cached, "tolerance": tolerance, "passed": ok}


async def _throughput(engine: TorchEngine) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for concurrency in (1, 16):
        started = time.perf_counter()
        results = await asyncio.gather(
            *(_run(engine, f"t{concurrency}-{i}", PROMPTS[1], 64) for i in range(concurrency))
        )
        wall = time.perf_counter() - started
        out[f"tokens_per_s_c{concurrency}"] = sum(len(_ids(r)) for r in results) / wall
    engine.clear_prefix_cache()
    long_ids = tuple(engine.tokenize(PROMPTS[2] * 8)[: engine.max_context - 2])
    started = time.perf_counter()
    params = SamplingParams(max_tokens=1, temperature=0)
    async for _ in engine.generate(GenerationRequest(request_id="ttft", prompt=long_ids, params=params)):
        break
    out["long_prompt_tokens"] = len(long_ids)
    out["long_prompt_ttft_ms"] = 1000 * (time.perf_counter() - started)
    return out


async def main_async(args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    import torch

    cuda = torch.cuda.is_available()
    report: dict[str, Any] = {"cuda": cuda, "torch": torch.__version__}
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: compare like with like
        torch.backends.cudnn.allow_tf32 = False
        report["gpu"] = torch.cuda.get_device_name(0)
        target = "cuda"
    else:
        _log("no CUDA device: the GPU checks cannot run here; running the same comparison CPU vs CPU instead")
        report["note"] = "no CUDA: CPU compared with CPU to exercise the script; proves nothing about a GPU"
        target = "cpu"
    folder = Path(args.model) if args.model else ensure_model(ModelRecipe.quick(), MODELS, progress=_log)
    report["model_dir"] = folder.name
    config = {"max_queue": 64, "max_running": 16}
    reference = TorchEngine.from_folder(folder, EngineConfig(device="cpu", **config))
    device = TorchEngine.from_folder(folder, EngineConfig(device=target, max_batch_tokens=256, **config))
    try:
        _log(f"correctness: cpu vs {target}")
        report["correctness"] = await asyncio.wait_for(_correctness(reference, device, args.tolerance), DEADLINE_S / 2)
        _log(f"throughput on {target}")
        report["throughput"] = await asyncio.wait_for(_throughput(device), DEADLINE_S / 3)
    finally:
        await reference.close()
        await device.close()
    passed = bool(report["correctness"]["passed"])
    report["passed"] = passed
    return report, 0 if passed else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: build the quick project model)")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="max |Δ log-prob| between CPU and CUDA")
    parser.add_argument("--out", help="also write the JSON report here")
    args = parser.parse_args()
    started = time.perf_counter()
    report, code = asyncio.run(main_async(args))
    report["seconds"] = time.perf_counter() - started
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    sys.exit(code)


if __name__ == "__main__":
    main()
