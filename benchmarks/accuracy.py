"""Perplexity of every built-in recipe on the default model (the protocol of docs/architecture.md).

    python benchmarks/accuracy.py [--recipes w8a8-dynamic,w4a16-gptq] [--samples 128] [--eval-tokens 20480]
    python benchmarks/accuracy.py --merge a.json,b.json   # rows of runs made in parallel (--out a, --out b)
    python benchmarks/accuracy.py --merge old.json,new.json --before old.json=LABEL  # + a before -> after table

Calibration: the first ``samples`` x 512 tokens of the calibration slice; evaluation: both slices,
windows of 512. Results are rewritten after every recipe (a long run that is interrupted keeps
what it finished) to benchmarks/results/accuracy.json and accuracy.md; JSON goes to stdout at the end.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from qnpu.jobs import evaluate, quantize_job
from qnpu.models import load
from qnpu.transforms import recipes

RESULTS = Path(__file__).resolve().parent / "results"
# llm-compressor 0.14.0.1 on the same protocol (issue "Models and calibration"); docs / code / seconds
PEER = {
    "w4a16-rtn (group 64)": (18.830, 11.307, 0.2),
    "w4a16-gptq (group 64)": (16.045, 10.524, 393),
    "w4a16-gptq": (17.168, 11.656, 370),
    "w8a8-dynamic (SmoothQuant 0.8 + GPTQ)": (13.136, 8.252, 651),
}


def _markdown(data: dict) -> str:
    base = data["baseline"]
    lines = [f"Default model ({data['model']}), baseline docs {base['docs']['ppl']:.3f} / code {base['code']['ppl']:.3f}; "
             f"calibration {data['samples']} x 512 tokens; evaluation {data['eval_tokens']} tokens per slice, windows "
             f"of 512; {data['env']}.", "",
             "| recipe | docs ppl | vs base | code ppl | vs base | quantize s | linear weights MiB (incl. float lm_head) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in data["rows"]:
        d, c = row["docs"], row["code"]
        lines.append(f"| {row['recipe']} | {d:.3f} | {100 * (d / base['docs']['ppl'] - 1):+.2f}% | {c:.3f} | "
                     f"{100 * (c / base['code']['ppl'] - 1):+.2f}% | {row['quantize_seconds']:.1f} | "
                     f"{row['linear_weight_bytes'] / 2**20:.1f} |")
    if any(r["recipe"].split(" ")[0] in ("billm", "slim-llm") for r in data["rows"]):
        lines += ["", "billm and slim-llm checkpoints hold packed codes (`qnpu.qcore.BiLLMTensor`, `MixedTensor`); "
                  "their weight column counts codes, fp32 scales and offsets and BiLLM's split bitmap as stored "
                  "(BiLLM's paper counts its sign bits only: about 1.1 bits per weight)."]
    if data.get("before"):
        lines += ["", f"Before -> after ({data['before']['label']}; the recipes measured again):", "",
                  "| recipe | docs ppl | code ppl | quantize s |", "|---|---:|---:|---:|"]
        old = {r["recipe"]: r for r in data["before"]["rows"]}
        for row in data["rows"]:
            b = old.get(row["recipe"])
            if b is not None and row["recipe"] in data["before"]["remeasured"]:
                lines.append(f"| {row['recipe']} | {b['docs']:.3f} -> {row['docs']:.3f} | {b['code']:.3f} -> "
                             f"{row['code']:.3f} | {b['quantize_seconds']:.1f} -> {row['quantize_seconds']:.1f} |")
    lines += ["", "Peer reference (llm-compressor, same protocol):", "", "| setting | docs | code | seconds |",
              "|---|---:|---:|---:|"]
    lines += [f"| {k} | {d:.3f} | {c:.3f} | {s} |" for k, (d, c, s) in PEER.items()]
    lines += ["", "Timed side by side with qnpu on the same ids and machine: `benchmarks/results/vs_llmcompressor.md`."]
    lines += ["", "Reproduce: `python benchmarks/accuracy.py` (add `--recipes a,b` for a subset)."]
    return "\n".join(lines) + "\n"


def _merge(paths: list[Path], out: Path, before: tuple[Path, str] | None = None) -> int:
    """Rows of ``paths`` (later files win for a recipe measured twice) into ``out``; with ``before``
    (a results JSON and its label) a before -> after table of the recipes both hold."""
    runs = [json.loads(p.read_text()) for p in paths]
    setups = {(r["samples"], r["eval_tokens"]) for r in runs}
    if len(setups) != 1:
        raise SystemExit(f"cannot merge runs with different (samples, eval_tokens): {sorted(setups)}")
    data = {**runs[0], "rows": []}
    if len(runs) > 1:
        envs = dict.fromkeys(r["env"] for r in runs)
        data["env"] = " / ".join(envs) + f"; rows from {len(runs)} runs, some side by side (timings include that " \
            "contention)"
    for run in runs:  # later files win for a recipe measured twice
        labels = {r["recipe"] for r in run["rows"]}
        data["rows"] = [r for r in data["rows"] if r["recipe"] not in labels] + run["rows"]
    order = {name: i for i, name in enumerate(recipes.names())}
    data["rows"].sort(key=lambda r: (order.get(r["recipe"].split(" ")[0], len(order)), r["recipe"]))
    if before is not None:
        old = json.loads(before[0].read_text())
        again = {r["recipe"] for run, path in zip(runs, paths) if path.resolve() != before[0].resolve() for r in run["rows"]}
        data["before"] = {"label": before[1], "remeasured": sorted(again), "rows": [{k: r[k] for k in ("recipe", "docs", "code", "quantize_seconds")}
                                                       for r in old["rows"]]}
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    out.with_suffix(".md").write_text(_markdown(data))
    print(_markdown(data))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", default=",".join(recipes.names()))
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--eval-tokens", type=int, default=20480)
    parser.add_argument("--group-size", type=int, default=None)
    parser.add_argument("--out", default=str(RESULTS / "accuracy"))
    parser.add_argument("--merge", default=None, help="comma-separated result JSONs (same samples and eval tokens) "
                        "to combine into --out instead of running anything")
    parser.add_argument("--before", default=None, help="with --merge: PATH=LABEL, an earlier results JSON whose "
                        "rows are shown before -> after")
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge:
        before = None
        if args.before:
            path, _, label = args.before.partition("=")
            before = (Path(path), label or path)
        return _merge([Path(p) for p in args.merge.split(",")], out, before)
    previous = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else {}
    model, tokenizer, source = load(None)
    env = f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}"
    same_setup = previous.get("samples") == args.samples and previous.get("eval_tokens") == args.eval_tokens
    # the baseline depends only on the evaluation setup: reuse it from an earlier run with the same one
    baseline = previous["baseline"] if same_setup and "baseline" in previous else \
        evaluate(model, tokenizer, n_tokens=args.eval_tokens, progress=False)
    data = {"model": source["name"], "samples": args.samples, "eval_tokens": args.eval_tokens, "env": env,
            "baseline": baseline, "rows": previous.get("rows", []) if same_setup else []}
    del model
    for name in args.recipes.split(","):
        start = time.perf_counter()
        report = quantize_job(recipe=name, group_size=args.group_size, samples=args.samples,
                              eval_tokens=args.eval_tokens, evaluate_baseline=False, output=None, progress=False)
        label = name if args.group_size is None else f"{name} (group {args.group_size})"
        row = {"recipe": label, "docs": report["quantized"]["docs"]["ppl"], "code": report["quantized"]["code"]["ppl"],
               "quantize_seconds": report["quantize_seconds"], "linear_weight_bytes": report["weight_bytes"]["linear_weights"],
               "worst_layers": report["worst_layers"], "wall_seconds": round(time.perf_counter() - start, 1)}
        data["rows"] = [r for r in data["rows"] if r["recipe"] != label] + [row]
        out.with_suffix(".json").write_text(json.dumps(data, indent=1))
        out.with_suffix(".md").write_text(_markdown(data))
        print(f"{label}: docs {row['docs']:.3f} code {row['code']:.3f} ({row['quantize_seconds']:.0f} s)", file=sys.stderr)
    print(json.dumps(data))
    print(_markdown(data), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
