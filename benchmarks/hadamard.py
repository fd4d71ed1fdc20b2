"""Fast Hadamard transform vs dense matmul on CPU.

For each size n, a seeded (2048, n) float32 batch is rotated by the normalized
Hadamard matrix of order n two ways: ``hadamard_transform(x)`` (core matmul +
fast Walsh-Hadamard butterflies, O(n (m + log n)) per row) and ``x @ Hn.T`` with
``Hn = hadamard(n) / sqrt(n)`` built beforehand (not timed).  Reports median
wall-clock times over several repeats after a warm-up, the speedup, the largest
absolute difference between the two outputs and the decomposition used.

Usage (from the repository root)::

    python benchmarks/hadamard.py [--repeats 5] [--rows 2048]

Writes ``benchmarks/results/hadamard.json`` and ``benchmarks/results/hadamard.md``;
prints the JSON object to stdout and the markdown table to stderr.  Exits with
status 1 if the fast path is not faster than the dense matmul at some size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from qnpu.qcore.hadamard import hadamard, hadamard_factors, hadamard_transform

SIZES = (4096, 12800, 14336)
RESULTS = Path(__file__).resolve().parent / "results"


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: first-touch allocations, core cache, thread pool start-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(sizes=SIZES, rows: int = 2048, repeats: int = 5, seed: int = 0) -> dict:
    results = []
    for n in sizes:
        _, _, how = hadamard_factors(n)
        x = torch.randn(rows, n, generator=torch.Generator().manual_seed(seed + n))
        dense_h = hadamard(n) / math.sqrt(n)
        fast_s = _median_seconds(lambda: hadamard_transform(x), repeats)
        dense_s = _median_seconds(lambda: x @ dense_h.T, repeats)
        diff = (hadamard_transform(x) - x @ dense_h.T).abs().max().item()
        results.append({
            "n": n, "how": how, "rows": rows, "dtype": "float32", "repeats": repeats,
            "fast_ms": round(fast_s * 1e3, 3), "dense_ms": round(dense_s * 1e3, 3),
            "speedup": round(dense_s / fast_s, 2), "max_abs_diff": diff,
        })
        del dense_h
    env = {
        "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "machine": platform.machine(), "platform": platform.platform(),
    }
    return {"benchmark": "hadamard_transform_vs_dense", "rows": results, "environment": env}


def to_markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        "| n | decomposition | fast (ms) | dense (ms) | speedup | max abs diff |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(f"| {r['n']} | {r['how']} | {r['fast_ms']:.1f} | {r['dense_ms']:.1f} "
                     f"| {r['speedup']:.1f}x | {r['max_abs_diff']:.2e} |")
    first = report["rows"][0]
    lines.append("")
    lines.append(f"{first['rows']} rows of {first['dtype']}, median of {first['repeats']} after a "
                 f"warm-up; torch {env['torch']}, {env['torch_threads']} threads, "
                 f"{env['cpu_count']} CPUs ({env['machine']}).")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", type=int, default=2048)
    args = parser.parse_args(argv)
    report = run(rows=args.rows, repeats=args.repeats)
    markdown = to_markdown(report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "hadamard.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "hadamard.md").write_text(markdown)
    print(json.dumps(report, indent=2))
    print(markdown, file=sys.stderr)
    slower = [r["n"] for r in report["rows"] if r["fast_ms"] >= r["dense_ms"]]
    if slower:
        print(f"fast path not faster for n in {slower}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
