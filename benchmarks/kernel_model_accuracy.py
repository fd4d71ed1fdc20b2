"""Accuracy of the dense W4A8 kernel's per-group accumulation, fp32 (the kernel) vs fp16 (the fixpipe design).

For openPangu-Embedded-shaped linears (K = 1536, 4096, 12800) this quantizes synthetic activations
per token (a few outlier channels) and Gaussian weights per group, runs the numerics model
(`qnpu.lowering.ascend.kernel_model.w4a8`) with ``accumulate="fp32"`` and ``"fp16"``, and compares
each with the exact reference ``qnpu::w4a8_matmul``: elements failing CATLASS's golden check, the
median / p99 relative error and the mean absolute error, beside the same numbers for merely
casting the exact result to the output dtype. Results: benchmarks/results/kernel_model_accuracy.{json,md}.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import qnpu.lowering  # noqa: F401  (registers torch.ops.qnpu)
from qnpu.lowering.ascend import kernel_model as km

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = [(64, 1536, 512, 128), (64, 4096, 512, 128), (64, 4096, 512, 32), (64, 12800, 256, 128),
          (64, 12800, 256, 256)]


def _case(m, k, n, g, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * (1 + 5 * (torch.rand(k, generator=gen) < 0.01))
    w = torch.randn(k, n, generator=gen) * 0.02
    tok = x.abs().amax(1) / 127
    xq = torch.clamp(torch.round(x / tok[:, None]), -128, 127).to(torch.int8)
    wg = w.reshape(k // g, g, n)
    scale = wg.abs().amax(1) / 7
    wq = torch.clamp(torch.round(wg / scale[:, None]), -8, 7).reshape(k, n).to(torch.int32)
    return xq, torch.ops.qnpu.npu_convert_weight_to_int4pack(wq), scale, tok


def _stats(got, ref, k):
    err = (got.double() - ref.double()).abs()
    rel = err / ref.double().abs().clamp(min=1e-3)
    return {"catlass_fail": km.catlass_errors(got, ref, k), "median_rel": float(rel.median()),
            "p99_rel": float(rel.quantile(0.99)), "mean_abs": float(err.mean())}


def run(seed: int) -> list[dict]:
    rows = []
    for m, k, n, g in SHAPES:
        xq, wp, scale, tok = _case(m, k, n, g, seed)
        ref = torch.ops.qnpu.w4a8_matmul(xq, wp, scale, tok, group_size=g, output_dtype=torch.float32)
        for out in (torch.float16, torch.bfloat16):
            row = {"m": m, "k": k, "n": n, "group": g, "out": str(out).split(".")[1], "elements": m * n,
                   "cast_only": _stats(ref.to(out), ref, k)}
            for acc in ("fp32", "fp16"):
                row[acc] = _stats(km.w4a8(xq, wp, scale, tok, None, g, out, accumulate=acc), ref, k)
            rows.append(row)
    return rows


def table(rows) -> str:
    lines = ["| k | group | out | elements | CATLASS fails fp32 / fp16 / cast | p99 rel fp32 / fp16 / cast | "
             "mean abs fp32 / fp16 / cast |", "|---:|---:|---|---:|---|---|---|"]
    for r in rows:
        a, b, c = r["fp32"], r["fp16"], r["cast_only"]
        lines.append(f"| {r['k']} | {r['group']} | {r['out']} | {r['elements']} | {a['catlass_fail']} / "
                     f"{b['catlass_fail']} / {c['catlass_fail']} | {a['p99_rel']:.2e} / {b['p99_rel']:.2e} / "
                     f"{c['p99_rel']:.2e} | {a['mean_abs']:.2e} / {b['mean_abs']:.2e} / {c['mean_abs']:.2e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "kernel_model_accuracy.json"))
    args = ap.parse_args(argv)
    rows = run(args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"seed": args.seed, "rows": rows}, indent=1))
    md = table(rows)
    out.with_suffix(".md").write_text(f"# W4A8 per-group accumulation (seed {args.seed})\n\n{md}\n\n"
                                      "Reproduce: `python benchmarks/kernel_model_accuracy.py`.\n")
    print(json.dumps({"seed": args.seed, "rows": len(rows)}))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
