"""qnpu vs llm-compressor: GPTQ W4A16 wall time and perplexity on the default model, in one run.

    python benchmarks/vs_llmcompressor.py --peer-python /path/to/venv/bin/python \
        [--samples 128] [--seq-len 512] [--eval-tokens 20480] [--group-sizes none,128] [--threads 2]
        [--qnpu-forward-dtypes float32,bfloat16] [--peer-dtypes float32,bfloat16]

``--peer-python`` is an interpreter with ``llmcompressor`` installed (its own environment: it pins
other transformers versions; install it with ``pip install torch==2.13.0 llmcompressor``). Both
sides get the same calibration ids (`qnpu.jobs.calibration_ids`, default seed; the peer gets them
as a tensor, no shuffling), the same float32 model, the same thread count and batch size 8, and
run one after the other in fresh subprocesses on the same machine. qnpu runs its built-in
``w4a16-gptq`` recipe (int4 symmetric, act-order, static groups); the peer ``oneshot`` with
``GPTQModifier`` on the same scheme (`benchmarks/peer_llmcompressor.py`). Times compared:
qnpu's ``quantize_seconds`` (the block-by-block engine: calibration passes, GPTQ, propagation)
against the peer's ``oneshot`` call (its calibration and propagation pipeline and GPTQ). Both
runs once per forward dtype (and qnpu once per ``--qnpu-engines``: its default, true-sequential for
GPTQ, or one pass per block, which is what the peer does): qnpu's ``--forward-dtype`` (bfloat16 autocast of the blocks' forward
passes, statistics in float32), the peer's model loaded in that dtype. All models are then scored
with qnpu's perplexity protocol (both slices, windows of 512). Results go
to benchmarks/results/vs_llmcompressor.{json,md}; JSON on stdout, the table on stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# --qnpu-engines: qnpu's true_sequential argument (default: on for recipes that only round, as GPTQ)
ENGINES = {"default": None, "true-sequential": True, "one-pass": False}
RESULTS = Path(__file__).resolve().parent / "results"
HERE = Path(__file__).resolve().parent

QNPU_SIDE = """
import json, sys
from qnpu.jobs import quantize_job
args = json.loads(sys.argv[1])
r = quantize_job(recipe="w4a16-gptq", group_size=args["group_size"], samples=args["samples"],
                 seq_len=args["seq_len"], eval_tokens=args["eval_tokens"], evaluate_baseline=False, progress=False,
                 forward_dtype=args["forward_dtype"], true_sequential=args["true_sequential"])
print(json.dumps({"quantize_seconds": r["quantize_seconds"], "docs": r["quantized"]["docs"]["ppl"],
                  "code": r["quantized"]["code"]["ppl"], "true_sequential": r.get("true_sequential")}))
"""


def _env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE.parent), env.get("PYTHONPATH")) if p)
    return env


def _peer_ppl(weights: Path, eval_tokens: int) -> dict:
    from safetensors.torch import load_file

    from qnpu.jobs import evaluate
    from qnpu.models import load

    model, tokenizer, _ = load(None, progress=False)
    state = load_file(str(weights))
    missing = [k for k in state if k not in dict(model.named_parameters())]
    if missing:
        raise SystemExit(f"peer weights name parameters the model lacks: {missing[:3]}")
    with torch.no_grad():
        for key, value in state.items():
            model.get_parameter(key).copy_(value)
    # the peer's GPTQ leaves fake-quantized rows: at most 16 distinct values per row (per group)
    w = state["model.layers.0.mlp.down_proj.weight"]
    distinct = max(len(torch.unique(w[r])) for r in range(4))
    return {**{k: v["ppl"] for k, v in evaluate(model, tokenizer, n_tokens=eval_tokens, progress=False).items()},
            "distinct_values_row": distinct}


def _markdown(data: dict) -> str:
    lines = [f"GPTQ W4A16 on the default model: {data['samples']} x {data['seq_len']} calibration tokens, "
             f"{data['eval_tokens']} evaluation tokens per slice, {data['threads']} threads, batch 8; {data['env']}. "
             f"Baseline docs {data['baseline']['docs']:.3f} / code {data['baseline']['code']:.3f}. Runs in the order "
             "listed, one at a time.", "",
             "| weights | tool | forward dtype | docs ppl | code ppl | quantize s | time vs llm-compressor float32 |",
             "|---|---|---|---:|---:|---:|---:|"]
    engine = {True: " (true-sequential)", False: " (one pass)", None: ""}
    for row in data["rows"]:
        g = "per-channel" if row["group_size"] is None else f"group {row['group_size']}"
        ref = next((r for r in data["rows"] if r["group_size"] == row["group_size"] and r["tool"] != "qnpu"
                    and r["dtype"] == "float32"), None)
        ratio = f"{row['seconds'] / ref['seconds']:.2f}x" if ref else "-"
        tool = f"qnpu{engine[row.get('true_sequential')]}" if row["tool"] == "qnpu" else \
            f"llm-compressor {data['peer_version']}"
        lines.append(f"| {g} | {tool} | {row['dtype']} | {row['docs']:.3f} | {row['code']:.3f} | "
                     f"{row['seconds']:.1f} | {ratio} |")
    lines += ["", "Reproduce: `python benchmarks/vs_llmcompressor.py --peer-python VENV/bin/python`."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peer-python", required=True)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=20480)
    parser.add_argument("--group-sizes", default="none,128")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--qnpu-forward-dtypes", default="float32")
    parser.add_argument("--peer-dtypes", default="float32")
    parser.add_argument("--qnpu-engines", default="default",
                        help="comma-separated qnpu calibration engines: default, true-sequential, one-pass")
    parser.add_argument("--out", default=str(RESULTS / "vs_llmcompressor"))
    args = parser.parse_args()
    groups = [None if g == "none" else int(g) for g in args.group_sizes.split(",")]
    torch.set_num_threads(args.threads)

    from qnpu.jobs import calibration_ids, evaluate
    from qnpu.models import load
    from qnpu.models.default import default_cache_dir

    model, tokenizer, _ = load(None, progress=False)
    baseline = {k: v["ppl"] for k, v in evaluate(model, tokenizer, n_tokens=args.eval_tokens, progress=False).items()}
    del model
    ids = calibration_ids(tokenizer, args.samples, args.seq_len)
    env = _env(args.threads)
    rows, peer_version = [], None
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(ids, Path(tmp) / "ids.pt")
        for g in groups:
            for dtype in args.peer_dtypes.split(","):
                out = Path(tmp) / f"peer-{g}-{dtype}"
                cmd = [args.peer_python, str(HERE / "peer_llmcompressor.py"), "--model", str(default_cache_dir()),
                       "--ids", str(Path(tmp) / "ids.pt"), "--out", str(out), "--dtype", dtype]
                if g is not None:
                    cmd += ["--group-size", str(g)]
                t0 = time.perf_counter()
                with open(Path(tmp) / "peer.log", "w") as log:
                    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=log)
                peer = json.loads((out / "peer.json").read_text())
                peer_version = peer["llmcompressor"]
                wall = time.perf_counter() - t0
                ppl = _peer_ppl(out / "weights.safetensors", args.eval_tokens)
                rows.append({"group_size": g, "tool": "llm-compressor", "dtype": dtype, "docs": ppl["docs"],
                             "code": ppl["code"], "seconds": peer["oneshot_seconds"], "process_seconds": round(wall, 1),
                             "distinct_values_row": ppl["distinct_values_row"]})
                print(f"group {g}: llm-compressor {dtype} {peer['oneshot_seconds']:.1f} s", file=sys.stderr)
            for dtype, engine in ((d, e) for d in args.qnpu_forward_dtypes.split(",")
                                  for e in args.qnpu_engines.split(",")):
                spec = {"group_size": g, "samples": args.samples, "seq_len": args.seq_len,
                        "eval_tokens": args.eval_tokens, "forward_dtype": None if dtype == "float32" else dtype,
                        "true_sequential": ENGINES[engine]}
                t0 = time.perf_counter()
                done = subprocess.run([sys.executable, "-c", QNPU_SIDE, json.dumps(spec)], env=env, check=True,
                                      capture_output=True, text=True)
                q = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append({"group_size": g, "tool": "qnpu", "dtype": dtype, "docs": q["docs"], "code": q["code"],
                             "seconds": q["quantize_seconds"], "process_seconds": round(time.perf_counter() - t0, 1),
                             "true_sequential": q["true_sequential"]})
                print(f"group {g}: qnpu {dtype} {q['quantize_seconds']:.1f} s", file=sys.stderr)
    data = {"samples": args.samples, "seq_len": args.seq_len, "eval_tokens": args.eval_tokens, "threads": args.threads,
            "env": f"torch {torch.__version__}, {platform.machine()}, load average {os.getloadavg()[0]:.2f} at the end",
            "baseline": baseline, "peer_version": peer_version, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    out.with_suffix(".md").write_text(_markdown(data))
    print(json.dumps(data))
    print(_markdown(data), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
