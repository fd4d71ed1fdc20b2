"""Perplexity of each export re-loaded, beside the simulated model it came from (default model, fp32).

    python benchmarks/export_accuracy.py [--settings w8a8,w4a16-gptq:64] [--samples 16] [--eval-tokens 8192]

For each setting (``recipe`` or ``recipe:group``) the default model is quantized once and
evaluated (simulated, fake-quant); then it is exported in every format that can express it and
read back: AscendV1 with ``qnpu.lowering.load_ascend_v1`` (the integer reference kernels), and
compressed-tensors with transformers + the compressed-tensors library (what vLLM / transformers
users load; needs ``compressed-tensors``). Results: benchmarks/results/export_accuracy.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from qnpu.jobs import calibration_ids, evaluate
from qnpu.lowering import LoweringError, export, load_ascend_v1
from qnpu.models import load, quantize_model
from qnpu.transforms import recipes

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = "w8a8,w8a8-dynamic,w8a16,w4a16-gptq:64,w4a8"


def _ppl(model, tokenizer, n_tokens) -> dict:
    return {k: v["ppl"] for k, v in evaluate(model, tokenizer, n_tokens=n_tokens, progress=False).items()}


def _reload(fmt: str, path: Path):
    if fmt == "ascend-v1":
        return load_ascend_v1(path)
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        except Exception:  # packed asymmetric zero points need the dequantizing path of transformers
            return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=
                                                        CompressedTensorsConfig(dequantize=True)).eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", default=SETTINGS)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    args = parser.parse_args()
    _, tokenizer, source = load(None, progress=False)
    ids = calibration_ids(tokenizer, args.samples, 512)
    rows = []
    env = f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}"
    for setting in args.settings.split(","):
        name, _, group = setting.partition(":")
        model, _, _ = load(None, progress=False)
        quantize_model(model, recipes.get(name, group_size=int(group) if group else None), ids, progress=False)
        row = {"setting": setting, "simulated": _ppl(model, tokenizer, args.eval_tokens)}
        for fmt in ("ascend-v1", "compressed-tensors"):
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    path = export(model, Path(tmp) / "out", fmt, tokenizer=tokenizer)
                except LoweringError as err:
                    row[fmt] = {"refused": str(err).split(":", 1)[1].strip()[:120]}
                    continue
                row[fmt] = _ppl(_reload(fmt, path), tokenizer, args.eval_tokens)
            row[fmt]["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        print(f"{setting}: {row}", file=sys.stderr, flush=True)
        data = {"model": source["name"], "samples": args.samples, "eval_tokens": args.eval_tokens, "env": env,
                "rows": rows}
        lines = [f"Default model ({data['model']}), float32; calibration {args.samples} x 512 tokens; evaluation "
                 f"{args.eval_tokens} tokens per slice, windows of 512; {env}.", "",
                 "| setting | simulated docs / code | AscendV1 re-loaded | vs simulated | compressed-tensors re-loaded | "
                 "vs simulated |", "|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            sim = r["simulated"]
            cells = []
            for fmt in ("ascend-v1", "compressed-tensors"):
                got = r[fmt]
                if "refused" in got:
                    cells += [f"refused: {got['refused']}", ""]
                else:
                    cells += [f"{got['docs']:.3f} / {got['code']:.3f}",
                              f"{100 * (got['docs'] / sim['docs'] - 1):+.3f}% / {100 * (got['code'] / sim['code'] - 1):+.3f}%"]
            lines.append(f"| {r['setting']} | {sim['docs']:.3f} / {sim['code']:.3f} | " + " | ".join(cells) + " |")
        lines += ["", "Reproduce: `python benchmarks/export_accuracy.py`."]
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "export_accuracy.json").write_text(json.dumps(data, indent=1))
        (RESULTS / "export_accuracy.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(data))
    print("\n".join(lines), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
