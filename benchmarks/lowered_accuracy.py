"""Lowered (integer-op) vs simulated (fake-quant) perplexity on the default model, fp32 and bf16.

    python benchmarks/lowered_accuracy.py [--settings w8a8,w4a16-gptq:64] [--samples 16] [--eval-tokens 20480]

For each setting (``recipe`` or ``recipe:group``) the default model is quantized once, then four
models are evaluated on both slices (windows of 512): the simulated model and ``lower(model,
"reference")`` in float32, and both again after ``.to(torch.bfloat16)``. The goal is the lowered
vs simulated difference, which does not depend on the calibration size, so calibration defaults to
16 x 512 tokens. Results are rewritten after every setting to benchmarks/results/lowered_accuracy.{json,md};
JSON goes to stdout at the end.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

from qnpu.jobs import calibration_ids, evaluate
from qnpu.lowering import lower, plan, scheme_counts
from qnpu.models import load, quantize_model
from qnpu.transforms import recipes

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = "w8a8,w8a8-dynamic,w8a16,w4a16-gptq,w4a16-gptq:64,w4a8"


def _pct(a: float, b: float) -> float:
    return 100 * (a / b - 1)


def _markdown(data: dict) -> str:
    lines = [f"Default model ({data['model']}); calibration {data['samples']} x 512 tokens; evaluation "
             f"{data['eval_tokens']} tokens per slice, windows of 512; {data['env']}.", "",
             "| setting | schemes | fp32 simulated docs / code | fp32 lowered docs / code | lowered vs simulated | "
             "bf16 simulated docs / code | bf16 lowered docs / code | bf16 lowered vs bf16 simulated | "
             "bf16 lowered vs fp32 simulated |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        s32, l32, s16, l16 = (r[k] for k in ("fp32_simulated", "fp32_lowered", "bf16_simulated", "bf16_lowered"))
        pair = lambda a, b: f"{_pct(a['docs'], b['docs']):+.3f}% / {_pct(a['code'], b['code']):+.3f}%"  # noqa: E731
        lines.append(f"| {r['setting']} | {', '.join(f'{n} {s}' for s, n in r['schemes'].items())} | "
                     f"{s32['docs']:.3f} / {s32['code']:.3f} | {l32['docs']:.3f} / {l32['code']:.3f} | {pair(l32, s32)} | "
                     f"{s16['docs']:.3f} / {s16['code']:.3f} | {l16['docs']:.3f} / {l16['code']:.3f} | "
                     f"{pair(l16, s16)} | {pair(l16, s32)} |")
    lines += ["", "Reproduce: `python benchmarks/lowered_accuracy.py`."]
    return "\n".join(lines) + "\n"


def _ppl(model, tokenizer, n_tokens, what: str) -> dict:
    start = time.perf_counter()
    out = {k: v["ppl"] for k, v in evaluate(model, tokenizer, n_tokens=n_tokens, progress=False).items()}
    print(f"  {what}: {out} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", default=SETTINGS, help="comma-separated recipe or recipe:group")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--eval-tokens", type=int, default=20480)
    parser.add_argument("--out", default=str(RESULTS / "lowered_accuracy"))
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _, tokenizer, source = load(None, progress=False)
    ids = calibration_ids(tokenizer, args.samples, 512)
    env = f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}"
    data = {"model": source["name"], "samples": args.samples, "eval_tokens": args.eval_tokens, "env": env, "rows": []}
    for setting in args.settings.split(","):
        name, _, group = setting.partition(":")
        start = time.perf_counter()
        model, _, _ = load(None, progress=False)
        quantize_model(model, recipes.get(name, group_size=int(group) if group else None), ids, progress=False)
        row = {"setting": setting, "schemes": scheme_counts(plan(model))}
        print(f"{setting}: quantized in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        row["fp32_simulated"] = _ppl(model, tokenizer, args.eval_tokens, "fp32 simulated")
        row["fp32_lowered"] = _ppl(lower(model), tokenizer, args.eval_tokens, "fp32 lowered")
        bf16 = copy.deepcopy(model).to(torch.bfloat16)
        del model
        row["bf16_simulated"] = _ppl(bf16, tokenizer, args.eval_tokens, "bf16 simulated")
        row["bf16_lowered"] = _ppl(lower(bf16), tokenizer, args.eval_tokens, "bf16 lowered")
        row["seconds"] = round(time.perf_counter() - start, 1)
        data["rows"] = [r for r in data["rows"] if r["setting"] != setting] + [row]
        out.with_suffix(".json").write_text(json.dumps(data, indent=1))
        out.with_suffix(".md").write_text(_markdown(data))
        print(f"{setting}: {row}", file=sys.stderr)
    print(json.dumps(data))
    print(_markdown(data), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
