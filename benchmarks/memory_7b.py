"""Peak memory of streaming W8A8 quantization of a 7B-shaped Llama from disk.

A random-initialised Llama with 7B shapes (hidden 4096, FFN 11008, 32 layers, 32 heads, vocabulary
32000, bfloat16, ~13.5 GB) is written to a temporary folder as sharded safetensors, one shard per
block, by a child process that generates it block by block from a seeded generator (never more
than one block in memory). The parent process then quantizes it with W8A8-dynamic
(``chain(quant_specs(weight=QSpec(bits=8), activation=QSpec(bits=8, granularity="token",
dynamic=True)), rtn())``) via `qnpu.models.lazy.quantize_from_disk`, calibrating on a few random
token sequences and streaming every block into a `qnpu.models.checkpoint.CheckpointWriter`.

Measured in the parent (which does nothing else): peak RSS from ``getrusage(RUSAGE_SELF).ru_maxrss``
and from a thread sampling ``VmHWM`` / ``VmRSS`` in ``/proc/self/status``; wall time of
generation and of quantize + write. Both temporary folders are deleted at the end.

Usage (from the repository root)::

    python benchmarks/memory_7b.py [--samples 4] [--seq 128] [--layers 32] [--tmp /tmp]

Writes ``benchmarks/results/memory_7b.json`` and ``.md``; prints the JSON object to stdout and the
markdown table to stderr. Exits 1 if peak RSS >= 24 GiB, 2 if the disk lacks room.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 1024 ** 3
LIMIT_GIB = 24
SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=32, vocab_size=32000)


def config_dict(layers: int) -> dict:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **SHAPE, "num_hidden_layers": layers,
            "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}


def block_shapes() -> dict[str, tuple[int, ...]]:
    h, f = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    return {"self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (h, h), "self_attn.v_proj.weight": (h, h),
            "self_attn.o_proj.weight": (h, h), "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h),
            "mlp.down_proj.weight": (h, f), "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,)}


def _random(shape, gen) -> torch.Tensor:
    if len(shape) == 1:  # RMSNorm weights near 1
        return (1.0 + 0.1 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
    return (torch.randn(shape, generator=gen) / shape[-1] ** 0.5).to(torch.bfloat16)


def generate(folder: Path, layers: int, seed: int) -> None:
    """Write config.json + one safetensors shard per block (+ one for the edges) + the index."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_dict(layers), indent=1))
    gen = torch.Generator().manual_seed(seed)
    total = layers + 1
    weight_map = {}
    for i in range(total):
        name = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        if i < layers:
            tensors = {f"model.layers.{i}.{k}": _random(s, gen) for k, s in block_shapes().items()}
        else:
            h, v = SHAPE["hidden_size"], SHAPE["vocab_size"]
            tensors = {"model.embed_tokens.weight": (torch.randn(v, h, generator=gen)).to(torch.bfloat16),
                       "model.norm.weight": _random((h,), gen), "lm_head.weight": _random((v, h), gen)}
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


class PeakSampler(threading.Thread):
    """Samples VmHWM / VmRSS of this process every ``interval`` seconds."""

    def __init__(self, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak, self.stop = interval, 0, threading.Event()

    @staticmethod
    def read() -> int:
        values = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                values[key] = int(rest.split()[0]) * 1024
        return max(values.values(), default=0)

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.read())
            self.stop.wait(self.interval)
        self.peak = max(self.peak, self.read())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def quantize(src: Path, out: Path, samples: int, seq: int, seed: int) -> dict:
    from qnpu.models.checkpoint import CheckpointWriter
    from qnpu.models.lazy import quantize_from_disk
    from qnpu.qcore import QSpec
    from qnpu.transforms import chain, quant_specs, recipe_to_dict, rtn

    recipe = chain(quant_specs(weight=QSpec(bits=8), activation=QSpec(bits=8, granularity="token", dynamic=True)),
                   rtn())
    ids = torch.randint(0, SHAPE["vocab_size"], (samples, seq), generator=torch.Generator().manual_seed(seed))
    config = json.loads((src / "config.json").read_text())
    start = time.perf_counter()
    with CheckpointWriter(out, source={"path": str(src), "synthetic": "random llama-7b shapes"},
                          recipe=recipe_to_dict(recipe), hf_config=config) as writer:
        result = quantize_from_disk(src, recipe, ids, on_block=lambda r: writer.add(*r.checkpoint_payload()),
                                    progress=True)
        writer.add(result.edges)
        writer.close(extra={"calibration": f"{samples} x {seq} random token ids"})
    seconds = time.perf_counter() - start
    errors = [b.output_error for b in result.blocks]
    return {"quantize_write_s": round(seconds, 1), "per_block_s": round(seconds / len(result.blocks), 2),
            "block_output_error_max": max(errors), "block_output_error_mean": sum(errors) / len(errors),
            "worst_linears": [[n, round(e, 5)] for n, e in result.worst_linears(5)]}


def to_markdown(r: dict) -> str:
    rows = [("model", f"random Llama, 7B shapes ({r['layers']} layers, hidden 4096, FFN 11008, vocab 32000), "
                      f"bf16, {r['float_gb']:.2f} GB on disk in {r['shards']} shards"),
            ("recipe", "W8A8-dynamic: int8 per-channel weights (RTN), int8 per-token dynamic activations"),
            ("calibration", r["calibration"]),
            ("peak RSS (getrusage ru_maxrss)", f"{r['peak_rss_gib']:.2f} GiB"),
            ("peak RSS (sampled VmHWM)", f"{r['sampled_peak_gib']:.2f} GiB"),
            ("limit", f"< {LIMIT_GIB} GiB: {'pass' if r['passed'] else 'FAIL'}"),
            ("quantize + write", f"{r['quantize_write_s']:.0f} s ({r['per_block_s']:.1f} s/block)"),
            ("generate float model", f"{r['generate_s']:.0f} s (child process, peak {r['generate_peak_gib']:.2f} GiB)"),
            ("int8 checkpoint", f"{r['int8_gb']:.2f} GB"),
            ("block output error", f"max {r['block_output_error_max']:.4f}, mean {r['block_output_error_mean']:.4f}")]
    lines = ["| quantity | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    lines.append("")
    lines.append(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs "
                 f"({platform.machine()}); quantize_from_disk on CPU.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tmp", default=tempfile.gettempdir())
    parser.add_argument("--generate", metavar="FOLDER", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.generate:
        generate(Path(args.generate), args.layers, args.seed)
        return 0

    h, f, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    params = args.layers * (4 * h * h + 3 * h * f) + 2 * v * h
    need = params * 2 + args.layers * (4 * h * h + 3 * h * f) + 2 * v * h * 2 + GIB
    free = shutil.disk_usage(args.tmp).free
    if free < need:
        print(f"{args.tmp} has {free / GIB:.1f} GiB free; this benchmark needs {need / GIB:.1f} GiB", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="qnpu-memory7b-", dir=args.tmp))
    try:
        src, out = tmp / "float", tmp / "int8"
        start = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--generate", str(src), "--layers", str(args.layers),
                        "--seed", str(args.seed)], check=True)
        generate_s = time.perf_counter() - start
        generate_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        sampler = PeakSampler()
        sampler.start()
        measured = quantize(src, out, args.samples, args.seq, args.seed)
        sampler.stop.set()
        sampler.join()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        report = {"layers": args.layers, "float_gb": folder_bytes(src) / 1e9,
                  "shards": len(list(src.glob("*.safetensors"))), "int8_gb": folder_bytes(out) / 1e9,
                  "calibration": f"{args.samples} x {args.seq} random token ids (seed {args.seed})",
                  "peak_rss_gib": peak / GIB, "sampled_peak_gib": sampler.peak / GIB,
                  "limit_gib": LIMIT_GIB, "passed": max(peak, sampler.peak) < LIMIT_GIB * GIB,
                  "generate_s": round(generate_s, 1), "generate_peak_gib": generate_peak / GIB, **measured,
                  "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    markdown = to_markdown(report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "memory_7b.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "memory_7b.md").write_text(markdown)
    print(json.dumps(report, indent=2))
    print(markdown, file=sys.stderr)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
