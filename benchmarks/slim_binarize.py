"""SliM-LLM's 1-bit groups: binarized (``mu + a sign(w - mu)``) vs the asymmetric ``{0, x}`` 1-bit grid.

On every linear of seeded random blocks (`qnpu.testing.random_block`, hidden 256, FFN 512,
256 calibration tokens with correlated channels and outliers) the calibration objective
``tr((W - Q) H (W - Q)^T)`` of `qnpu.transforms.slim_llm` at 2 bits, groups of 32, uint asymmetric:

* ``forced``: half the groups at 1 bit (``k = G // 2`` pairs), one GPTQ sweep per variant;
* ``search``: the full transform (SBA search over ``k``, SQC grid 10), which picks its own ``k``.

Variants: ``binarize`` (``a = mean|w - mu|``, qnpu), ``reference_alpha`` (``a = mean|w|``, the
scale the paper's reference code takes; forced only) and ``grid`` (``one_bit="grid"``). Per seed the
ratio is the block's summed objective over the grid's; the table gives mean and standard deviation
over seeds and the per-linear range.

Usage (from the repository root)::

    python benchmarks/slim_binarize.py [--seeds 8]

Writes ``benchmarks/results/slim_binarize.json`` and ``.md``; prints the JSON to stdout and the
markdown table to stderr.
"""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

from qnpu.qcore import QSpec
from qnpu.testing import random_block
from qnpu.transforms.billm import column_salience, hessian_error, inverse_hessian_cholesky

slim = importlib.import_module("qnpu.transforms.slim_llm")  # the package re-exports a function of that name

RESULTS = Path(__file__).resolve().parent / "results"
SPEC = QSpec(bits=2, symmetric=False, format="uint")
GROUP = 32


def reference_alpha(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.abs().mean(1, keepdim=True), x.mean(1, keepdim=True)


def forced(w: torch.Tensor, h: torch.Tensor) -> dict[str, float]:
    w_c, u = inverse_hessian_cholesky(w, h, 0.01)
    n_groups = w.shape[1] // GROUP
    alloc = slim.allocate_bits(column_salience(w_c, torch.diag(u)).reshape(n_groups, GROUP).sum(1), 2, n_groups // 2)
    h_diag = torch.diag(h).to(w_c.dtype)
    out = {}
    own = slim.binarize_params
    for name, mode, params in (("binarize", "binarize", own), ("reference_alpha", "binarize", reference_alpha),
                               ("grid", "grid", own)):
        slim.binarize_params = params
        try:
            q = slim.mixed_gptq(w_c, u, h_diag, SPEC, alloc, GROUP, one_bit=mode)
        finally:
            slim.binarize_params = own
        out[name] = hessian_error(w_c, q.dequantize(w_c.dtype), h)
    return out


def search(w: torch.Tensor, h: torch.Tensor) -> dict[str, float]:
    out = {}
    for mode in ("binarize", "grid"):
        sw = slim.slim_llm_quantize(w, h, SPEC, bits=2, group_size=GROUP, one_bit=mode)
        out[mode] = float(sw.objective[sw.pairs])
        out[f"{mode}_pairs"] = sw.pairs
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=8)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for seed in range(args.seeds):
        view = random_block(seed, hidden=256, intermediate=512, num_heads=8, num_kv_heads=4, head_dim=32,
                            batch=4, seq=64)
        for name in view.structure.linears:
            w, h = view.weight(name), view.stats[name].hessian
            rows.append({"seed": seed, "linear": name, "forced": forced(w, h), "search": search(w, h)})
        print(f"seed {seed} done", file=sys.stderr)
    summary = {}
    for setting, variants in (("forced", ("binarize", "reference_alpha")), ("search", ("binarize",))):
        for v in variants:
            per_seed = []
            for seed in range(args.seeds):
                mine = [r[setting] for r in rows if r["seed"] == seed]
                per_seed.append(sum(m[v] for m in mine) / sum(m["grid"] for m in mine))
            per_linear = [r[setting][v] / r[setting]["grid"] for r in rows]
            summary[f"{setting}/{v}"] = {"mean": statistics.mean(per_seed), "stdev": statistics.stdev(per_seed),
                                         "min_linear": min(per_linear), "max_linear": max(per_linear)}
    result = {"summary": summary, "rows": rows, "seeds": args.seeds, "group_size": GROUP,
              "torch": torch.__version__, "machine": platform.machine()}
    table = ["| setting / variant | objective / {0, x} grid (mean over seeds) | stdev | per-linear min | max |",
             "|---|---:|---:|---:|---:|"]
    for key, s in summary.items():
        table.append(f"| {key} | {s['mean']:.3f} | {s['stdev']:.3f} | {s['min_linear']:.3f} | {s['max_linear']:.3f} |")
    md = "\n".join(table) + (f"\n\n{args.seeds} random blocks x 7 linears, SliM-LLM 2-bit uint asymmetric, groups of "
                             f"{GROUP}; torch {torch.__version__}, 1 thread.\n")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "slim_binarize.json").write_text(json.dumps(result, indent=1))
    (RESULTS / "slim_binarize.md").write_text(md)
    print(json.dumps(result["summary"], indent=1))
    print(md, file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
