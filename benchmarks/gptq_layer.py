"""GPTQ on one large linear layer, CPU: wall-clock time and Hessian-weighted error vs RTN.

For each ``out x in`` size a seeded float32 weight ``W ~ N(0, 1/in)`` is GPTQ-rounded (block 128,
act_order, 4-bit symmetric per-channel; `qnpu.transforms.gptq.gptq_quantize`) with the Hessian
``H = X^T X / n`` of ``n = 128 x 512`` synthetic tokens. The tokens look like LLM activations:
``X = (Z B + E) D``, a rank-``r`` shared part (``Z [n, r]``, ``B [r, in]`` Gaussian) that makes the
channels correlated, an independent part ``E`` (0.5x the shared part's scale), and outlier channels
(``D``: 0.4% of channels scaled 20-50x). ``H`` is accumulated over 2048-token chunks in float32 so
memory stays ``O(in^2)``; building it is timed separately. Reported: GPTQ time (median and all
repeats), ``tr((W - Q) H (W - Q)^T)`` for GPTQ and for RTN on the same grid, their ratio.

Usage (from the repository root)::

    python benchmarks/gptq_layer.py [--sizes 4096x4096 4096x12800] [--repeats 3] [--tokens 65536]

Writes ``benchmarks/results/gptq_layer.json`` and ``.md``; prints the JSON to stdout and the
markdown table to stderr. The machine may be shared: the 1-minute load average is recorded.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time

import torch

from _results import emit
from qnpu.qcore import QSpec, choose_qparams, dequantize, quantize
from qnpu.transforms.gptq import gptq_quantize

SPEC = QSpec(bits=4)
CHUNK = 2048


def synthetic_hessian(n_in: int, tokens: int, seed: int, rank: int = 256) -> torch.Tensor:
    """``X^T X / tokens`` of ``X = (Z B + 0.5 E) D`` (see the module docstring), float32, in chunks."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, n_in, generator=g) / math.sqrt(rank)
    scale = torch.ones(n_in)
    n_out = max(1, n_in // 256)
    scale[torch.randperm(n_in, generator=g)[:n_out]] = 20 + 30 * torch.rand(n_out, generator=g)
    h = torch.zeros(n_in, n_in)
    for start in range(0, tokens, CHUNK):
        m = min(CHUNK, tokens - start)
        x = torch.randn(m, rank, generator=g) @ basis
        x.add_(torch.randn(m, n_in, generator=g), alpha=0.5).mul_(scale)
        h.addmm_(x.T, x)
    return h.div_(tokens)


def weighted_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    d = w - q
    return float(((d @ h) * d).sum(dtype=torch.float64))


def run(sizes, repeats: int = 3, tokens: int = 128 * 512, seed: int = 0) -> dict:
    rows = []
    for out, n_in in sizes:
        start = time.perf_counter()
        h = synthetic_hessian(n_in, tokens, seed + n_in)
        hessian_s = time.perf_counter() - start
        w = torch.randn(out, n_in, generator=torch.Generator().manual_seed(seed + 1)) / math.sqrt(n_in)
        times = []
        for _ in range(repeats):
            load = os.getloadavg()[0]
            start = time.perf_counter()
            q, info = gptq_quantize(w, h, SPEC, block_size=128, act_order=True, label=f"bench.{out}x{n_in}")
            times.append((time.perf_counter() - start, load))
        grid = choose_qparams(w, SPEC)
        rtn = quantize(w, SPEC, scale=grid[0], zero_point=grid[1])
        err_gptq, err_rtn = weighted_error(w, dequantize(q), h), weighted_error(w, dequantize(rtn), h)
        rows.append({
            "out": out, "in": n_in, "tokens": tokens, "block_size": 128, "act_order": True,
            "spec": "int4 symmetric per-channel", "time_s": round(statistics.median(t for t, _ in times), 3),
            "times_s": [round(t, 3) for t, _ in times], "load_avg_1m": [round(ld, 2) for _, ld in times],
            "hessian_build_s": round(hessian_s, 2), "damp": info["damp"],
            "error_gptq": err_gptq, "error_rtn": err_rtn, "error_ratio": round(err_gptq / err_rtn, 4),
        })
        del h, w, q, rtn
    env = {"torch": torch.__version__, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "python": platform.python_version(), "machine": platform.machine(), "platform": platform.platform()}
    return {"benchmark": "gptq_layer", "rows": rows, "environment": env}


def to_markdown(report: dict) -> str:
    env = report["environment"]
    lines = ["| out x in | GPTQ time (s, median) | all repeats (s) | load avg | H build (s) "
             "| H-weighted error GPTQ / RTN |", "|---|---:|---|---|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['out']} x {r['in']} | {r['time_s']:.2f} | {', '.join(f'{t:.2f}' for t in r['times_s'])} "
                     f"| {', '.join(f'{ld:.1f}' for ld in r['load_avg_1m'])} | {r['hessian_build_s']:.1f} "
                     f"| {r['error_ratio']:.3f} |")
    lines.append("")
    lines.append(f"int4 symmetric per-channel, block 128, act_order, H from {report['rows'][0]['tokens']} tokens; "
                 f"torch {env['torch']}, {env['torch_threads']} threads, {env['cpu_count']} CPUs ({env['machine']}).")
    return "\n".join(lines) + "\n"


def _size(text: str) -> tuple[int, int]:
    out, n_in = text.lower().split("x")
    return int(out), int(n_in)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=_size, default=[(4096, 4096), (4096, 12800)],
                        help="layers as OUTxIN")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128 * 512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="print only; keep results/ as it is")
    args = parser.parse_args(argv)
    report = run(args.sizes, repeats=args.repeats, tokens=args.tokens, seed=args.seed)
    emit("gptq_layer", report, to_markdown(report), write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
