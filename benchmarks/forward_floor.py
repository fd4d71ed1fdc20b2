"""The floor of layer-by-layer calibration: one forward pass of the default model's decoder over the
calibration tokens (every sequential scheme runs at least this), to set quantization times against.

    python benchmarks/forward_floor.py [--samples 128] [--seq-len 512] [--batch-size 8]

Prints JSON and a markdown table; writes benchmarks/results/forward_floor.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from qnpu.jobs import calibration_ids
from qnpu.models import load

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    model, tokenizer, source = load(None, progress=False)
    ids = calibration_ids(tokenizer, args.samples, args.seq_len)
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, args.samples, args.batch_size):
            model.model(input_ids=ids[i:i + args.batch_size], use_cache=False)
    seconds = time.perf_counter() - start
    data = {"model": source["name"], "tokens": f"{args.samples} x {args.seq_len}", "batch_size": args.batch_size,
            "decoder_forward_seconds": round(seconds, 1),
            "env": f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}"}
    table = ("| model | tokens | decoder forward s | env |\n|---|---|---:|---|\n"
             f"| {data['model']} | {data['tokens']} | {data['decoder_forward_seconds']} | {data['env']} |\n")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "forward_floor.json").write_text(json.dumps(data, indent=1))
    (RESULTS / "forward_floor.md").write_text(table)
    print(json.dumps(data))
    print(table, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
