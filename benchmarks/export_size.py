"""Bytes of each AscendV1 export of the default model vs the bf16 model, per scheme.

    python benchmarks/export_size.py [--settings w8a8,w8a16:64,w4a16-gptq:64@compressed-tensors] [--dtype bfloat16]

A setting is ``recipe[:group][@format]`` (format: ascend-v1, the default, or compressed-tensors).

Sizes depend only on the scheme, not on how well it was calibrated, so each setting is quantized
on 2 x 128 calibration tokens. The quantized linears' tensors and the float rest (embedding,
lm_head when untied, norms) are reported separately; the reference is the float model saved as
bf16 safetensors. Results: benchmarks/results/export_size.{json,md}; JSON on stdout.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

from qnpu.jobs import DTYPES, calibration_ids
from qnpu.lowering import export, plan, scheme_counts
from qnpu.models import load, quantize_model
from qnpu.transforms import recipes

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = ("w8a8,w8a8-dynamic,w8a16,w8a16:64,w4a8,w8a8-dynamic@compressed-tensors,w4a16-gptq@compressed-tensors,"
            "w4a16-gptq:64@compressed-tensors")
MIB = 2**20


def _tensor_bytes(folder: Path) -> dict[str, int]:
    out = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                t = f.get_slice(key)
                shape, dtype = t.get_shape(), t.get_dtype()
                size = {"F32": 4, "I64": 8, "I32": 4, "BF16": 2, "F16": 2, "I8": 1, "U8": 1}[dtype]
                n = 1
                for d in shape:
                    n *= d
                out[key] = n * size
    return out


def _split(sizes: dict[str, int], labels) -> dict[str, int]:
    """Bytes of the given linears' tensors (their bias included), of the embedding and lm_head, and the rest."""
    prefixes = tuple(f"{label}." for label in labels)
    quant = sum(v for k, v in sizes.items() if k.startswith(prefixes))
    embed = sum(v for k, v in sizes.items() if "embed_tokens" in k or k.startswith("lm_head"))
    return {"quantized_linears": quant, "embedding_and_head": embed, "other": sum(sizes.values()) - quant - embed,
            "total": sum(sizes.values())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", default=SETTINGS)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer, source = load(None, progress=False)
        model.to(torch.bfloat16).save_pretrained(Path(tmp) / "bf16")
        linears = [n for n, _ in model.named_modules() if n.startswith("model.layers.") and n.endswith("_proj")]
        base = _split(_tensor_bytes(Path(tmp) / "bf16"), linears)
        ids = calibration_ids(tokenizer, 2, 128)
        for setting in args.settings.split(","):
            recipe, _, fmt = setting.partition("@")
            name, _, group = recipe.partition(":")
            start = time.perf_counter()
            model, _, _ = load(None, progress=False)
            quantize_model(model, recipes.get(name, group_size=int(group) if group else None), ids, progress=False)
            schemes = plan(model)
            out = export(model.to(dtype), Path(tmp) / setting.replace(":", "-g").replace("@", "-"), fmt or "ascend-v1")
            split = _split(_tensor_bytes(out), schemes)
            rows.append({"setting": setting, "layer_types": scheme_counts(schemes), **split,
                         "linears_vs_bf16": round(split["quantized_linears"] / base["quantized_linears"], 4),
                         "total_vs_bf16": round(split["total"] / base["total"], 4),
                         "seconds": round(time.perf_counter() - start, 1)})
            print(f"{setting}: {rows[-1]}", file=sys.stderr, flush=True)
    data = {"model": source["name"], "export_dtype": args.dtype, "bf16_model": base, "rows": rows}
    lines = [f"Exports (AscendV1 unless marked @compressed-tensors) of {data['model']} ({args.dtype} float parts) vs the bf16 model "
             f"(linears {base['quantized_linears'] / MIB:.1f} MiB, embedding/lm_head "
             f"{base['embedding_and_head'] / MIB:.1f} MiB, total {base['total'] / MIB:.1f} MiB).", "",
             "| setting | layer types | quantized linears MiB | vs bf16 | embedding + lm_head MiB | other MiB | "
             "total MiB | vs bf16 |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {', '.join(f'{n} {t}' for t, n in r['layer_types'].items())} | "
                     f"{r['quantized_linears'] / MIB:.2f} | {r['linears_vs_bf16']:.3f} | "
                     f"{r['embedding_and_head'] / MIB:.2f} | {r['other'] / MIB:.2f} | {r['total'] / MIB:.2f} | "
                     f"{r['total_vs_bf16']:.3f} |")
    lines += ["", "Reproduce: `python benchmarks/export_size.py`."]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "export_size.json").write_text(json.dumps(data, indent=1))
    (RESULTS / "export_size.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(data))
    print("\n".join(lines), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
