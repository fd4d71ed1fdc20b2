"""GPTQ W4A16 on 7B-shaped decoder layers on a CUDA GPU: seconds per layer, split into its phases.

A seeded random Llama with Llama-2-7B's layer shapes (hidden 4096, FFN 11008, 32 heads of 128,
vocabulary 32000; `memory_7b.SHAPE`, weights ``N(0, 1/in)`` as `memory_7b`'s generator makes them,
bfloat16 by default) is built on the CPU. Its embedding rows are random activations with mixed
channels and a few outlier channels (``E = Z A``, 1 in 256 channels x 20-50; independent channels would
leave GPTQ nothing to do), and the calibration ids are seeded random tokens, so every layer sees
random activations of that shape: by default 128 sequences of 2048 tokens. The calibration engine
(`qnpu.models.engine.quantize_model`, as ``qnpu quantize --device cuda`` runs it) moves each block to
the GPU, collects every linear input's ``X^T X``, runs the recipe there (``w4a16-gptq``: int4
symmetric, GPTQ with act-order and static groups, block 128) and runs the quantized block forward to
get the next block's inputs; the block goes back to the CPU with its results.

Per layer, with the device synchronised at each boundary:

* ``collect_s``: the float block's forward over all calibration tokens with the Hessian hooks;
* ``solve_s``: the recipe, GPTQ on the 7 linears (with the view's copies to the recipe's device);
* ``forward_s``: the write-back, the per-linear errors and the quantized block's forward;
* ``total_s``: the whole step, the block's trips to and from the GPU included.

Both weight grids run: groups of 128 and per-channel. The first layer includes CUDA's warm-up, so the
summary is the mean over the later layers (``--layers`` >= 2). Reference point: llm-compressor's
GPTQ W4A16 is quoted at about 6.6 s per Llama-7B layer on an H100 (not measured here).

Usage (from the repository root)::

    python benchmarks/gptq_gpu.py [--layers 3] [--samples 128] [--seq-len 2048] [--batch-size 8]
    python benchmarks/gptq_gpu.py --device cpu --hidden 128 --layers 2 --samples 2 --seq-len 64   # smoke run

Without a CUDA device, ``--device cuda`` (the default) prints ``{"benchmark": "gptq_gpu", "skipped":
"no CUDA device"}`` and exits 0. Results (``benchmarks/results/gptq_gpu.json`` and ``.md``) are
written only by CUDA runs; other runs print the JSON to stdout and the table to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager

import torch

from _results import emit
from memory_7b import SHAPE, _random, config_dict
from qnpu.eval.efficiency import device_sync
from qnpu.models.engine import LayerwiseCalibration, progress_bar
from qnpu.models.families import block_structure, family_for
from qnpu.transforms import recipes

ANCHOR = {"tool": "llm-compressor", "s_per_layer": 6.6, "device": "H100", "scheme": "GPTQ W4A16, Llama-7B"}
GRIDS = {"g128": 128, "channel": None}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def shape(hidden: int | None) -> dict:
    """Llama-2-7B's dimensions, or smaller ones keeping its ratios: FFN ~2.69x hidden rounded to a
    multiple of 128 (groups of 128 divide every input), heads of 128 (fewer for a tiny hidden)."""
    if hidden is None:
        return dict(SHAPE)
    ffn = max(128, round(hidden * SHAPE["intermediate_size"] / SHAPE["hidden_size"] / 128) * 128)
    heads = max(1, hidden // 128)
    return {**SHAPE, "hidden_size": hidden, "intermediate_size": ffn, "num_attention_heads": heads,
            "num_key_value_heads": heads, "vocab_size": min(SHAPE["vocab_size"], 4096)}


def build_model(dims: dict, layers: int, dtype: torch.dtype, seed: int):
    """A seeded random Llama on the CPU (see the module docstring)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = {**config_dict(layers), **dims, "num_hidden_layers": layers}
    config = LlamaConfig(**{k: v for k, v in fields.items() if k not in ("model_type", "architectures", "torch_dtype")})
    with torch.device("meta"):  # no float init of 7B-shaped weights that are overwritten below
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(dtype).eval()
    model.model.rotary_emb = type(model.model.rotary_emb)(config)  # its buffers were left empty
    gen = torch.Generator(device="cpu").manual_seed(seed)
    h = dims["hidden_size"]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed" not in name:
                p.copy_(_random(tuple(p.shape), gen))
        mix = torch.randn(h, h, generator=gen) / h ** 0.5
        embed = torch.randn(dims["vocab_size"], h, generator=gen) @ mix
        outliers = torch.randperm(h, generator=gen)[: max(1, h // 256)]
        embed[:, outliers] *= 20 + 30 * torch.rand(outliers.numel(), generator=gen)
        model.get_input_embeddings().weight.copy_(embed)
    return model


class TimedCalibration(LayerwiseCalibration):
    """The engine with its phases timed per block (device synchronised at each boundary)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sync = device_sync(self.device)
        self.phases: list[dict] = []

    @contextmanager
    def clock(self, name: str):
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        self.phases[-1][name] = self.phases[-1].get(name, 0.0) + time.perf_counter() - start

    def _step(self, block, index, prefix):
        self.phases.append({})
        with self.clock("total_s"):
            result = super()._step(block, index, prefix)
        row = self.phases[-1]
        row["solve_s"] = row.pop("one_pass_s") - row["collect_s"]
        row["forward_s"] = row["total_s"] - row["collect_s"] - row["solve_s"]
        row["output_error"] = result.output_error
        return result

    def _calibrate(self, block, prefix, batches=None):
        with self.clock("collect_s"):
            return super()._calibrate(block, prefix, batches)

    def _one_pass(self, block, prefix, batches=None):
        with self.clock("one_pass_s"):
            return super()._one_pass(block, prefix, batches)


def run_grid(model, ids, group: int | None, device: str, batch_size: int, progress: bool) -> list[dict]:
    recipe = recipes.get("w4a16-gptq", group_size=group)
    family, structure = family_for(model.config), block_structure(model.config)
    run = TimedCalibration(recipe, family, structure, device=device, batch_size=batch_size, true_sequential=False)
    run.capture(model, ids)
    layers = model.get_submodule(family.layers)
    with progress_bar(len(layers), progress) as bar:
        for i, block in enumerate(layers):
            run.step(block, i)
            bar.update()
    return [{"layer": i, **{k: round(v, 4) for k, v in row.items()}} for i, row in enumerate(run.phases)]


def summary(rows: list[dict]) -> dict:
    steady = rows[1:] or rows
    return {k: round(statistics.mean(r[k] for r in steady), 3) for k in ("collect_s", "solve_s", "forward_s",
                                                                         "total_s")}


def environment(device: str) -> dict:
    env = {"torch": torch.__version__, "device": device, "cuda": torch.version.cuda,
           "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "python": platform.python_version(),
           "machine": platform.machine()}
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def to_markdown(report: dict) -> str:
    s = report["settings"]
    where = report["environment"].get("gpu", s["device"])
    lines = [f"GPTQ W4A16 (act-order, static groups, block 128) on {s['layers']} random layers of hidden "
             f"{s['hidden']}, FFN {s['intermediate']}, {s['heads']} heads, {s['dtype']}; calibration "
             f"{s['samples']} x {s['seq_len']} tokens, batch {s['batch_size']}; {where}.",
             "", "| grid | layer | collect X^T X (s) | GPTQ solve (s) | forward (s) | total (s) | block output error |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for grid, data in report["grids"].items():
        for r in data["layers"]:
            lines.append(f"| {grid} | {r['layer']} | {r['collect_s']:.2f} | {r['solve_s']:.2f} "
                         f"| {r['forward_s']:.2f} | {r['total_s']:.2f} | {r['output_error']:.4f} |")
        m = data["mean_after_first"]
        lines.append(f"| {grid} | mean (layers 1..) | {m['collect_s']:.2f} | {m['solve_s']:.2f} | "
                     f"{m['forward_s']:.2f} | **{m['total_s']:.2f}** | |")
    a = report["anchor"]
    lines += ["", f"Reference: {a['tool']} {a['scheme']}, quoted at ~{a['s_per_layer']} s per layer on an "
              f"{a['device']} (not measured here)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda[:i] (default) | cpu (a smoke run: nothing written)")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=None, help="a smaller hidden size (FFN and heads follow)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--grids", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="print only; keep results/ as it is")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(json.dumps({"benchmark": "gptq_gpu", "skipped": "no CUDA device"}))
        return 0
    dims = shape(args.hidden)
    ids = torch.randint(0, dims["vocab_size"], (args.samples, args.seq_len),
                        generator=torch.Generator(device="cpu").manual_seed(args.seed + 1))
    grids = {}
    for grid in args.grids:
        model = build_model(dims, args.layers, DTYPES[args.dtype], args.seed)
        rows = run_grid(model, ids, GRIDS[grid], args.device, args.batch_size, progress=True)
        grids[grid] = {"group_size": GRIDS[grid], "layers": rows, "mean_after_first": summary(rows)}
        del model
    report = {"benchmark": "gptq_gpu", "recipe": "w4a16-gptq", "anchor": ANCHOR, "grids": grids,
              "settings": {"device": args.device, "layers": args.layers, "samples": args.samples,
                           "seq_len": args.seq_len, "batch_size": args.batch_size, "dtype": args.dtype,
                           "hidden": dims["hidden_size"], "intermediate": dims["intermediate_size"],
                           "heads": dims["num_attention_heads"], "seed": args.seed},
              "environment": environment(args.device)}
    emit("gptq_gpu", report, to_markdown(report), write=args.device.startswith("cuda") and not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
