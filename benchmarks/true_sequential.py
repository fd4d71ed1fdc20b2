"""True-sequential calibration vs one pass per block: block-output error on random blocks, and
perplexity of the default model.

``blocks``: for each seed, a `qnpu.testing.random_block` (hidden 64, FFN 96, 4 heads / 2 KV heads,
correlated channels with 2 outlier channels, 16 x 32 tokens) run by a one-layer HF Llama
(`tests.models.random_llama`) is quantized by the engine with GPTQ and GPTAQ (act-order, per
channel; W4 symmetric full range, W3 / W2 asymmetric, as the built-in recipes) with
``true_sequential`` on and off; reported: the block's relative output error
``||y - y_q|| / ||y||`` on its calibration tokens (`BlockResult.output_error`), mean and spread
(min..max) over the seeds, and the ratio off / on per seed.

``model``: one ``qnpu quantize`` job on the default model (`qnpu.jobs.quantize_job`, no baseline
evaluation) per ``--recipes`` x ``--seeds`` x on/off, with ``--samples``, ``--seq-len`` and
``--eval-tokens``; one JSON file per run under ``--runs`` (a run already there is not repeated), then
the table of perplexities (``--collect``: only the runs already there).

Usage (from the repository root)::

    python benchmarks/true_sequential.py blocks [--seeds 0 1 2 3 4 5 6 7]
    python benchmarks/true_sequential.py model [--recipes w4a16-gptq w4a16-gptaq] [--seeds 0]
        [--samples 16 --seq-len 512 --eval-tokens 8192] [--runs DIR]

Writes ``benchmarks/results/true_sequential_<part><tag>.json`` and ``.md`` (``--tag``, model part only); prints the JSON to stdout and
the markdown table to stderr. The machine may be shared: the 1-minute load average is recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from qnpu.models.engine import quantize_model  # noqa: E402
from qnpu.qcore import QSpec  # noqa: E402
from qnpu.testing.blocks import random_block  # noqa: E402
from qnpu.transforms import chain, gptaq, gptq, quant_specs  # noqa: E402
from tests.models.random_llama import llama_of_block  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SPECS = {"W4": QSpec(bits=4, full_range=True), "W3": QSpec(bits=3, format="uint", symmetric=False),
         "W2": QSpec(bits=2, format="uint", symmetric=False)}
ROUNDERS = {"GPTQ": gptq, "GPTAQ": gptaq}


def block_error(seed: int, bits: str, rounder: str, sequential: bool) -> float:
    model, ids = llama_of_block(random_block(seed, batch=16, seq=32))
    recipe = chain(quant_specs(weight=SPECS[bits]), ROUNDERS[rounder]())
    result = quantize_model(model, recipe, ids, progress=False, true_sequential=sequential)
    assert result.true_sequential == sequential
    return result.blocks[0].output_error


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def blocks(seeds: list[int]) -> tuple[dict, str]:
    rows = []
    for bits in SPECS:
        for rounder in ROUNDERS:
            on = [block_error(s, bits, rounder, True) for s in seeds]
            off = [block_error(s, bits, rounder, False) for s in seeds]
            rows.append({"bits": bits, "rounder": rounder, "on": spread(on), "off": spread(off),
                         "off_over_on": spread([b / a for a, b in zip(on, off)]), "seeds": seeds,
                         "on_values": on, "off_values": off})
    lines = ["| weights | rounder | error, true-sequential | error, one pass | one pass / true-sequential |",
             "|---|---|---|---|---|"]
    for r in rows:
        cell = lambda d, f="{:.4f}": f"{f.format(d['mean'])} ({f.format(d['min'])}..{f.format(d['max'])})"  # noqa: E731
        lines.append(f"| {r['bits']} | {r['rounder']} | {cell(r['on'])} | {cell(r['off'])} | "
                     f"{cell(r['off_over_on'], '{:.3f}')} |")
    return {"part": "blocks", "rows": rows}, "\n".join(lines)


def model(recipes: list[str], seeds: list[int], samples: int, seq_len: int, eval_tokens: int, runs: Path,
          collect: bool = False):
    from qnpu.jobs import quantize_job

    runs.mkdir(parents=True, exist_ok=True)
    rows = []
    for recipe in recipes:
        for seed in seeds:
            for sequential in (False, True):
                path = runs / f"{recipe}-seed{seed}-{'on' if sequential else 'off'}.json"
                if not path.is_file() and collect:
                    continue
                if not path.is_file():
                    report = quantize_job(recipe=recipe, samples=samples, seq_len=seq_len, seed=seed,
                                          eval_tokens=eval_tokens, evaluate_baseline=False, progress=True,
                                          true_sequential=sequential)
                    path.write_text(json.dumps(report, indent=1, default=str))
                report = json.loads(path.read_text())
                rows.append({"recipe": recipe, "seed": seed, "true_sequential": sequential,
                             "docs": report["quantized"]["docs"]["ppl"], "code": report["quantized"]["code"]["ppl"],
                             "quantize_seconds": report["quantize_seconds"]})
    lines = ["| recipe | calibration seed | true-sequential | docs ppl | code ppl | quantize s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['recipe']} | {r['seed']} | {'on' if r['true_sequential'] else 'off'} | {r['docs']:.3f} | "
              f"{r['code']:.3f} | {r['quantize_seconds']:.0f} |" for r in rows]
    return {"part": "model", "samples": samples, "seq_len": seq_len, "eval_tokens": eval_tokens, "rows": rows}, \
        "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    p_b = sub.add_parser("blocks")
    p_b.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    p_m = sub.add_parser("model")
    p_m.add_argument("--recipes", nargs="+", default=["w4a16-gptq", "w4a16-gptaq"])
    p_m.add_argument("--seeds", type=int, nargs="+", default=[0])
    p_m.add_argument("--samples", type=int, default=16)
    p_m.add_argument("--seq-len", type=int, default=512)
    p_m.add_argument("--eval-tokens", type=int, default=8192)
    p_m.add_argument("--runs", type=Path, default=Path("true_sequential_runs"))
    p_m.add_argument("--collect", action="store_true", help="tabulate the runs already in --runs, run nothing")
    p_m.add_argument("--tag", default="", help="suffix of the result files (true_sequential_model<TAG>.json/.md)")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.part == "blocks":
        data, table = blocks(args.seeds)
    else:
        data, table = model(args.recipes, args.seeds, args.samples, args.seq_len, args.eval_tokens, args.runs,
                            args.collect)
    data.update(load_average_1m=os.getloadavg()[0], torch=torch.__version__, threads=torch.get_num_threads())
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"true_sequential_{args.part}{getattr(args, 'tag', '')}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n")
    (RESULTS / f"{stem}.md").write_text(table + "\n")
    print(json.dumps(data, indent=1))
    print(table, file=sys.stderr)


if __name__ == "__main__":
    main()
