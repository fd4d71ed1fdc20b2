"""GPTQ group grids: static groups vs grids fixed when the sweep reaches a group, on random layers.

For each seed a float32 layer ``W ~ N(0, 1/in)`` (``out x in``) and tokens ``X = Z A`` with a random
mixing ``A`` (correlated channels), optionally with a few outlier channels 10-50x larger, give
``H = X^T X / n``. Every weight spec (bits, group size) is GPTQ-rounded
(`qnpu.transforms.gptq.gptq_quantize`, block 128, damp 0.01) in act-order and in natural order,
with ``static_groups=True`` (each group's grid from the weight before the sweep) and ``False``
(a group's grid from its current, error-updated weights when the sweep first reaches one of its
columns). Reported: the layer objective ``tr((W - Q) H (W - Q)^T)`` relative to RTN on each
group's own min-max grid (mean +- sample std over seeds) and the paired ratio dynamic / static
(mean +- std, min, max; > 1: static groups are better).

Usage (from the repository root)::

    python benchmarks/gptq_groups.py [--seeds 8] [--out 256] [--in 512] [--tokens 2048]

Writes ``benchmarks/results/gptq_groups.json`` and ``.md``; prints the JSON to stdout and the
markdown table to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

from qnpu.qcore import QSpec, dequantize, quantize
from qnpu.testing import mixed_layer
from qnpu.transforms.gptq import gptq_quantize

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = [(2, 64), (2, 128), (3, 64), (3, 128), (4, 64), (4, 128)]


def spec_for(bits: int, group_size: int) -> QSpec:
    """The recipes' weight specs: asymmetric below 4 bits, symmetric full-range int4."""
    sym = bits == 4
    return QSpec(bits=bits, format="int" if sym else "uint", symmetric=sym, full_range=sym,
                 granularity="group", group_size=group_size, axis=-1)


def layer(seed: int, out: int, n_in: int, tokens: int, outliers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W [out, in], H [in, in])`` for one seed (module docstring)."""
    w, x = mixed_layer(seed, n_in, tokens, outliers, out=out)
    return w, x.T @ x / tokens


def objective(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    d = (w - q).double()
    return float(((d @ h.double()) * d).sum())


def _summary(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def run(seeds: int = 8, out: int = 256, n_in: int = 512, tokens: int = 2048, outliers=(0, 4)) -> dict:
    rows = []
    for n_out in outliers:
        data = [layer(seed, out, n_in, tokens, n_out) for seed in range(seeds)]
        for bits, group in CONFIGS:
            spec = spec_for(bits, group)
            for act_order in (True, False):
                rel = {True: [], False: []}
                for w, h in data:
                    base = objective(w, dequantize(quantize(w, spec)), h)
                    for static in (True, False):
                        q, _ = gptq_quantize(w, h, spec, act_order=act_order, static_groups=static)
                        rel[static].append(objective(w, dequantize(q), h) / base)
                ratio = [d / s for d, s in zip(rel[False], rel[True])]
                rows.append({"bits": bits, "group_size": group, "outlier_channels": n_out, "act_order": act_order,
                             "static_vs_rtn": _summary(rel[True]), "dynamic_vs_rtn": _summary(rel[False]),
                             "dynamic_over_static": _summary(ratio),
                             "dynamic_wins": sum(r < 1 for r in ratio), "seeds": seeds})
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "cpu_count": os.cpu_count()}
    return {"benchmark": "gptq_groups", "layer": {"out": out, "in": n_in, "tokens": tokens}, "rows": rows,
            "environment": env}


def to_markdown(report: dict) -> str:
    lines = ["| bits | group | outlier channels | order | static / RTN | dynamic / RTN | dynamic / static "
             "(mean +- std) | min .. max | dynamic better |", "|---:|---:|---:|---|---:|---:|---:|---|---:|"]
    for r in report["rows"]:
        s, d, x = r["static_vs_rtn"], r["dynamic_vs_rtn"], r["dynamic_over_static"]
        lines.append(f"| {r['bits']} | {r['group_size']} | {r['outlier_channels']} | "
                     f"{'act-order' if r['act_order'] else 'natural'} | {s['mean']:.4f} +- {s['std']:.4f} | "
                     f"{d['mean']:.4f} +- {d['std']:.4f} | {x['mean']:.3f} +- {x['std']:.3f} | "
                     f"{x['min']:.3f} .. {x['max']:.3f} | {r['dynamic_wins']} / {r['seeds']} |")
    lay = report["layer"]
    lines.append("")
    lines.append(f"Layer objective tr((W - Q) H (W - Q)^T) relative to RTN on the same groups; {lay['out']} x "
                 f"{lay['in']} layers, H from {lay['tokens']} tokens, one layer per seed; block 128, damp 0.01. "
                 "Asymmetric uint below 4 bits, symmetric full-range int4.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--out", type=int, default=256)
    parser.add_argument("--in", dest="n_in", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--no-write", action="store_true", help="print only; keep results/ as it is")
    args = parser.parse_args(argv)
    if args.seeds < 2 or args.n_in % 128:
        parser.error("--seeds must be >= 2 (for a spread) and --in a multiple of 128")
    report = run(args.seeds, args.out, args.n_in, args.tokens)
    text, table = json.dumps(report, indent=2), to_markdown(report)
    for suffix, body in () if args.no_write else (("json", text + "\n"), ("md", table)):
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"gptq_groups.{suffix}").write_text(body)
    print(text)
    print(table, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
