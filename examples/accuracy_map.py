"""The second source paper's accuracy map: RTN, GPTQ, GPTAQ, AWQ, SmoothQuant, BiLLM and SliM-LLM
across bit widths, each cell's perplexity on both evaluation slices plus the conditional perplexity
of HumanEval's reference solutions, as a table and a heatmap.

    python examples/accuracy_map.py --model PATH [--methods gptq,awq] [--bits 2,3,4,8] [--output DIR]

Cells: weight-only methods at every ``--bits`` (int, symmetric on the full grid at 4 and 8 bits,
asymmetric below 4, as the built-in recipes); ``smoothquant`` is W{b}A{b} (SmoothQuant alpha 0.5, RTN
weights, per-token dynamic b-bit activations; at 4 bits this is the paper's W4A4 setting, whose
perplexity may be non-finite: such a cell is shown as ``inf``); ``billm`` has its own ~1.1 bits and
sits in column 1; ``slim-llm`` runs at its mean bit budget for 2 and 3. Results go to
``<output>/accuracy_map.json`` (after every cell: rerunning the command resumes), ``.md`` and
``accuracy_map.png``. With ``--model`` a 1B/7B openPangu-Embedded folder the same command gives the
paper's setting; on the default 135M model the protocol is shortened (see ``--samples``,
``--eval-tokens``) and the numbers speak for that model only.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

from common import Results, csv, finite_or_none, reference_perplexity

from qnpu.jobs import quantize_job
from qnpu.models import load
from qnpu.qcore import QSpec
from qnpu.transforms import awq, billm, chain, gptaq, gptq, quant_specs, recipe_to_dict, rtn, slim_llm, smoothquant

METHODS = ("rtn", "gptq", "gptaq", "awq", "smoothquant", "billm", "slim-llm")


def weight_spec(bits: int, group_size: int | None) -> QSpec:
    symmetric = bits >= 4
    kw = dict(bits=bits, format="int" if symmetric else "uint", symmetric=symmetric, full_range=symmetric and bits <= 4)
    if group_size is not None:
        kw.update(granularity="group", group_size=group_size, axis=-1)
    return QSpec(**kw)


def recipe(method: str, bits: int, group_size: int | None):
    """The recipe of one cell, or None where the method has no such bit width."""
    w = weight_spec(bits, group_size)
    if method == "billm":
        return chain(quant_specs(weight=QSpec(bits=1, format="binary")), billm(block_size=group_size or 128)) \
            if bits == 1 else None
    if method == "slim-llm":
        return chain(quant_specs(weight=weight_spec(bits, None)), slim_llm(bits=bits, group_size=group_size or 64)) \
            if bits in (2, 3) else None
    if bits == 1:
        return None
    if method == "smoothquant":
        act = QSpec(bits=bits, granularity="token", dynamic=True)
        return chain(quant_specs(weight=w, activation=act), smoothquant(alpha=0.5), rtn()) if bits >= 4 else None
    body = {"rtn": [rtn()], "gptq": [gptq()], "gptaq": [gptaq()], "awq": [awq(), rtn()]}[method]
    return chain(quant_specs(weight=w), *body)


def label(method: str, bits: int) -> str:
    if method == "smoothquant":
        return f"W{bits}A{bits}"
    return "~1.1" if method == "billm" else f"W{bits}A16"


def run_cell(args, method: str, bits: int, folder: Path) -> dict:
    recipe_file = folder / f"recipe-{method}-w{bits}.json"
    recipe_file.write_text(json.dumps(recipe_to_dict(recipe(method, bits, args.group_size)), indent=1))
    ckpt = folder / f"ckpt-{method}-w{bits}"
    start = time.perf_counter()
    report = quantize_job(model=args.model, recipe=str(recipe_file), samples=args.samples, seq_len=args.seq_len,
                          seed=args.seed, eval_tokens=args.eval_tokens, evaluate_baseline=False,
                          output=str(ckpt), overwrite_any=True, progress=not args.quiet)
    row = {"setting": label(method, bits), "docs": finite_or_none(report["quantized"]["docs"]["ppl"]),
           "code": finite_or_none(report["quantized"]["code"]["ppl"]),
           "linear_weight_bytes": report["weight_bytes"]["linear_weights"],
           "quantize_seconds": report["quantize_seconds"]}
    if args.ref_problems:
        model, tokenizer, _ = load(str(ckpt), progress=False)
        row["reference"] = reference_perplexity(model, tokenizer, args.ref_problems)
        del model
    row["wall_seconds"] = round(time.perf_counter() - start, 1)
    if not args.keep_checkpoints:
        shutil.rmtree(ckpt, ignore_errors=True)
    return row


def baseline(args) -> dict:
    from qnpu.jobs import evaluate

    model, tokenizer, source = load(args.model, progress=False)
    ppl = evaluate(model, tokenizer, n_tokens=args.eval_tokens, progress=not args.quiet)
    row = {"setting": "FP16", "docs": ppl["docs"]["ppl"], "code": ppl["code"]["ppl"], "model": source.get("name")}
    if args.ref_problems:
        row["reference"] = reference_perplexity(model, tokenizer, args.ref_problems)
    return row


def fmt(value) -> str:
    return "inf" if value is None else f"{value:.2f}" if value < 1e4 else f"{value:.2e}"


def markdown(data: dict, methods, bits) -> str:
    cells, setup = data["cells"], data["setup"]
    fp = cells.get("fp", {})
    lines = [f"# Accuracy map: {fp.get('model', setup['model'])}", "",
             f"Calibration {setup['samples']} x {setup['seq_len']} tokens (seed {setup['seed']}), "
             f"{setup['eval_tokens']} evaluation tokens per slice, reference perplexity over "
             f"{setup['ref_problems']} HumanEval problems; {data['env']}. Each cell: docs / code / reference "
             f"perplexity (FP: {fmt(fp.get('docs'))} / {fmt(fp.get('code'))} / "
             f"{fmt(fp.get('reference', {}).get('ppl'))}).", "",
             "| method | " + " | ".join(f"{b} bits" for b in bits) + " |", "|---|" + "---:|" * len(bits)]
    for m in methods:
        row = []
        for b in bits:
            c = cells.get(f"{m}-w{b}")
            if c is None:
                row.append("-")
            elif "error" in c:
                row.append("failed")
            else:
                row.append(f"{fmt(c['docs'])} / {fmt(c['code'])} / {fmt(c.get('reference', {}).get('ppl'))}")
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    failed = [f"- {k}: {c['error']}" for k, c in cells.items() if "error" in c]
    return "\n".join(lines + ([""] + ["Failed cells:"] + failed if failed else [])) + "\n"


def heatmap(data: dict, methods, bits, path: Path) -> None:
    """log10 of docs perplexity relative to FP; non-finite cells hatched as 'inf'."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fp = data["cells"]["fp"]["docs"]
    grid = np.full((len(methods), len(bits)), np.nan)
    text = [["" for _ in bits] for _ in methods]
    for i, m in enumerate(methods):
        for j, b in enumerate(bits):
            c = data["cells"].get(f"{m}-w{b}")
            if c is None or "error" in c:
                continue
            text[i][j] = fmt(c["docs"])
            grid[i, j] = math.log10(c["docs"] / fp) if c["docs"] is not None else np.inf
    shown = np.where(np.isinf(grid), np.nan, grid)
    fig, ax = plt.subplots(figsize=(1.4 * len(bits) + 2, 0.6 * len(methods) + 1.5), dpi=100)
    img = ax.imshow(shown, cmap="viridis_r", aspect="auto")
    for i in range(len(methods)):
        for j in range(len(bits)):
            ax.text(j, i, text[i][j] or "-", ha="center", va="center", fontsize=8,
                    color="white" if np.isfinite(shown[i, j]) and shown[i, j] > np.nanmean(shown) else "black")
    ax.set_xticks(range(len(bits)), [f"{b} bits" for b in bits])
    ax.set_yticks(range(len(methods)), methods)
    ax.set_title(f"docs perplexity (FP {fp:.2f}); colour: log10(ppl / FP)")
    fig.colorbar(img, ax=ax)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default", help="HF folder or 'default'")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--bits", default="1,2,3,4,8", help="weight bits per column (1: BiLLM only)")
    parser.add_argument("--group-size", type=int, default=None, help="weight groups (default per-channel)")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-tokens", type=int, default=20480)
    parser.add_argument("--ref-problems", type=int, default=164, help="HumanEval problems for the reference "
                        "perplexity (0: skip)")
    parser.add_argument("--output", default="qnpu-out/accuracy-map")
    parser.add_argument("--keep-checkpoints", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    methods, bits = csv(args.methods), csv(args.bits, int)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"error: unknown method(s) {', '.join(unknown)}; allowed: {', '.join(METHODS)}")
    if any(not 1 <= b <= 8 for b in bits):
        raise SystemExit(f"error: --bits {args.bits}: each must be in 1..8")
    folder = Path(args.output)
    setup = {k: getattr(args, k) for k in ("model", "group_size", "samples", "seq_len", "seed", "eval_tokens",
                                           "ref_problems")}
    results = Results(folder, "accuracy_map", setup)
    if "fp" not in results:
        results.put("fp", baseline(args))
    for m in methods:
        for b in bits:
            key = f"{m}-w{b}"
            if recipe(m, b, args.group_size) is None or key in results:
                continue
            print(f"{key} ...", file=sys.stderr, flush=True)
            try:
                results.put(key, run_cell(args, m, b, folder))
            except Exception as err:  # noqa: BLE001 - one failed cell must not lose the others
                results.put(key, {"setting": label(m, b), "error": f"{type(err).__name__}: {err}"})
                print(f"{key} failed: {err}", file=sys.stderr)
    (folder / "accuracy_map.md").write_text(markdown(results.data, methods, bits))
    heatmap(results.data, methods, bits, folder / "accuracy_map.png")
    print((folder / "accuracy_map.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
