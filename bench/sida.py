"""S-IDA benchmark: split, combine and split+combine, today's code beside a baseline commit's, in one run.

Run ``python bench/sida.py`` (``--quick`` for fewer iterations, ``--baseline REV`` for another baseline). Prints a
table and writes ``bench/results/sida.json``. The baseline's ``_gf256.py`` and ``_sida.py`` are loaded from
``git show REV:...`` and run against today's AES-GCM (``node/privacy/_aes.py``), so the comparison isolates the
GF(2^8)/IDA code. Old and new are timed interleaved, one call each in turn, so machine noise hits both alike.

Target (issue 9): split + combine of 1 KiB at most 0.107 ms median, the reference prototype's C++.
"""

from __future__ import annotations

import argparse
import json
import platform
import secrets
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from node.privacy import _sida as sida_now

#: The last commit with the list-based GF(2^8) code (before the numpy-gather rewrite).
BASELINE = "ba66a2b"
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "sida.json"
#: (label, message bytes, n, k).
CASES = [("1KiB n4 k3", 1024, 4, 3), ("16KiB n4 k3", 16384, 4, 3), ("1KiB n16 k8", 1024, 16, 8)]
TARGET_MS = 0.107


class _Sida(Protocol):
    def split(self, data: bytes, n: int, k: int) -> Sequence[object]: ...

    def combine(self, cloves: Sequence[Any]) -> bytes: ...


def load_baseline(rev: str) -> types.ModuleType:
    """The baseline's ``_sida`` module, bound to the baseline's ``_gf256`` (both from ``git show``)."""

    def source(path: str) -> str:
        return subprocess.run(
            ["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout

    gf = types.ModuleType("bench_baseline_gf256")
    exec(compile(source("node/privacy/_gf256.py"), f"{rev}:_gf256.py", "exec"), gf.__dict__)
    sida_source = source("node/privacy/_sida.py").replace("from node.privacy import _gf256 as gf", "gf = _BASE_GF")
    sida = types.ModuleType("bench_baseline_sida")
    sida.__dict__["_BASE_GF"] = gf
    sys.modules[sida.__name__] = sida  # dataclasses look their module up by name
    exec(compile(sida_source, f"{rev}:_sida.py", "exec"), sida.__dict__)
    return sida


def _interleaved(fns: dict[str, Callable[[], object]], iterations: int) -> dict[str, list[float]]:
    for fn in fns.values():
        for _ in range(min(50, iterations)):
            fn()
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iterations):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - start)
    return out


def _stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"median_ms": statistics.median(ordered) * 1e3, "p99_ms": p99 * 1e3, "n": len(ordered)}


def _case_fns(impl: _Sida, message: bytes, n: int, k: int, some: list[object]) -> dict[str, Callable[[], object]]:
    return {
        "split": lambda: impl.split(message, n, k),
        "combine": lambda: impl.combine(some),
        "split+combine": lambda: impl.combine(impl.split(message, n, k)[:k]),
    }


def bench(impls: dict[str, _Sida], iterations: int) -> dict[str, Any]:
    """Per case and implementation: split, combine (of k cloves) and split+combine statistics."""
    results: dict[str, Any] = {}
    for label, size, n, k in CASES:
        message = secrets.token_bytes(size)
        cloves = {name: impl.split(message, n, k) for name, impl in impls.items()}
        for name, impl in impls.items():
            assert impl.combine(cloves[name][:k]) == message, name
        fns: dict[str, Callable[[], object]] = {}
        for name, impl in impls.items():
            # Combine the last k cloves, not the first k: a model node gets whichever k arrive.
            for op, fn in _case_fns(impl, message, n, k, list(cloves[name][n - k :])).items():
                fns[f"{name} {op}"] = fn
        samples = _interleaved(fns, iterations)
        results[label] = {key: _stats(value) for key, value in samples.items()}
    return results


def _print(results: dict[str, Any], names: list[str]) -> None:
    print(f"S-IDA medians in ms (target: split+combine of 1 KiB <= {TARGET_MS}); before = {results['baseline']}")
    print(f"  {'case':14} {'impl':8} {'split':>9} {'combine':>9} {'both':>9}")
    for label, row in results["cases"].items():
        for name in names:
            cells = "".join(f" {row[f'{name} {op}']['median_ms']:9.4f}" for op in ("split", "combine", "split+combine"))
            print(f"  {label:14} {name:8}{cells}")
        before = row["before split+combine"]["median_ms"]
        after = row["after split+combine"]["median_ms"]
        print(f"  {label:14} {'speed-up':8} {before / after:29.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer iterations (smoke run); writes nothing")
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the 'before' implementation")
    args = parser.parse_args()
    impls: dict[str, _Sida] = {"before": load_baseline(args.baseline), "after": sida_now}
    results: dict[str, Any] = {
        "baseline": args.baseline,
        "machine": {"python": platform.python_version(), "machine": platform.machine()},
        "target_split_plus_combine_1KiB_ms": TARGET_MS,
        "cases": bench(impls, 100 if args.quick else 3000),
    }
    _print(results, list(impls))
    if not args.quick:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        print(f"\nwrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
