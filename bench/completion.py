"""What privacy costs a real completion: the torch engine called in-process vs. the same engine behind a model node
reached over the overlay (S-IDA n=4, k=3), with 0 relays and with 3 relays per path.

Run ``python bench/completion.py``. Prints a table and writes ``bench/results/completion.json``.

Workload: the quick project model (built once under ``build/models``), short arithmetic prompts with a shared
few-shot prefix, greedy decoding of ``--gen-tokens`` tokens, one request at a time. The three ways run interleaved
(request i goes direct, then over 0 relays, then over 3 relays, in an order that rotates with i), so machine noise
hits all three alike, and the network is idle before each request. Everything (client, relays, model node, engine)
shares this process and 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import aiohttp

from node.inference import EngineConfig, GenerationRequest, ModelRecipe, SamplingParams, TorchEngine, ensure_model
from node.overlay import ClientSettings, CompletionRequest, complete, completion_handler
from node.overlay._localnet import LocalNetwork
from node.privacy import RelayDescriptor, select_paths

RESULTS = Path(__file__).resolve().parent / "results" / "completion.json"
MODELS = Path(__file__).resolve().parents[1] / "build" / "models"
SHOTS = "3+4=7\n10+5=15\n21+8=29\n6+6=12\n"


def _stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": statistics.median(samples) * 1e3,
        "p90_ms": ordered[int(0.9 * (len(ordered) - 1))] * 1e3,
        "n": len(samples),
    }


async def main_async(requests: int, gen_tokens: int) -> dict[str, Any]:
    model_dir = ensure_model(ModelRecipe.quick(), MODELS)
    engine = TorchEngine.from_folder(model_dir, EngineConfig(device="cpu"))
    times: dict[str, list[float]] = {"direct": [], "overlay_0_relays": [], "overlay_3_relays": []}
    firsts: dict[str, list[float]] = {k: [] for k in times}
    try:
        async with LocalNetwork(relays=6, handler=completion_handler(engine)) as net, aiohttp.ClientSession() as s:
            settings = ClientSettings(n=4, k=3)
            no_relays: list[list[RelayDescriptor]] = [[] for _ in range(4)]

            def ways(prompt: str) -> dict[str, Callable[[], Awaitable[float]]]:
                params = SamplingParams(max_tokens=gen_tokens, temperature=0.0)
                request = CompletionRequest(
                    model=engine.model_id, prompt=prompt, max_tokens=gen_tokens, temperature=0.0
                )

                async def direct() -> float:
                    started = time.perf_counter()
                    first = 0.0
                    async for chunk in engine.generate(GenerationRequest(request_id="b", prompt=prompt, params=params)):
                        first = first or (time.perf_counter() - started if chunk.token_ids else 0.0)
                    return first

                async def overlay(paths: list[list[RelayDescriptor]]) -> float:
                    started = time.perf_counter()
                    first = 0.0
                    async for delta in complete(s, request, paths, net.destination, settings):
                        first = first or (time.perf_counter() - started if delta.token_ids else 0.0)
                    return first

                return {
                    "direct": direct,
                    "overlay_0_relays": lambda: overlay(no_relays),
                    "overlay_3_relays": lambda: overlay(select_paths(net.descriptors(), 4, 3)),
                }

            names = list(times)
            for i in range(requests + 3):
                prompt = SHOTS + f"{i % 50}+{(7 * i) % 50}="
                calls = ways(prompt)
                order = names[i % 3 :] + names[: i % 3]
                for name in order:
                    await net.settle()  # untimed: no request pays for the previous one's draining paths
                    started = time.perf_counter()
                    first = await calls[name]()
                    if i >= 3:  # the first rounds warm up the engine, the connection pools and the prefix cache
                        times[name].append(time.perf_counter() - started)
                        firsts[name].append(first)
    finally:
        await engine.close()
    total = {k: _stats(v) for k, v in times.items()}
    ttft = {k: _stats(v) for k, v in firsts.items()}
    return {
        "bench": "completion",
        "model_dir": model_dir.name,
        "gen_tokens": gen_tokens,
        "requests": requests,
        "machine": {"machine": platform.machine(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "load_average_at_end": os.getloadavg()[0],
        "total": total,
        "first_token": ttft,
        "overhead_ms": {
            "0_relays_vs_direct": total["overlay_0_relays"]["median_ms"] - total["direct"]["median_ms"],
            "3_relays_vs_direct": total["overlay_3_relays"]["median_ms"] - total["direct"]["median_ms"],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--gen-tokens", type=int, default=16)
    args = parser.parse_args()
    result = asyncio.run(main_async(args.requests, args.gen_tokens))
    print(f"{'way':<22}{'total median ms':>17}{'p90':>9}{'first token ms':>16}")
    for name in result["total"]:
        total, first = result["total"][name], result["first_token"][name]
        print(f"{name:<22}{total['median_ms']:>17.1f}{total['p90_ms']:>9.1f}{first['median_ms']:>16.1f}")
    for name, value in result["overhead_ms"].items():
        print(f"overhead {name:<30}{value:>8.1f} ms")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
