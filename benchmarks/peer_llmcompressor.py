"""Peer side of benchmarks/vs_llmcompressor.py: llm-compressor's ``oneshot`` GPTQ W4A16 on given ids.

Runs in an environment that has llm-compressor (it does not import qnpu):

    PEER_PYTHON benchmarks/peer_llmcompressor.py --model DIR --ids ids.pt --out DIR [--group-size 128]

Loads the model from ``--model`` in ``--dtype`` (float32 by default) (a Hugging Face folder), runs ``oneshot`` with
``GPTQModifier`` on exactly the token ids in ``--ids`` (an int64 tensor, samples x seq_len; no
shuffling), weights int4 symmetric per output channel (or in groups along the input), every
Linear but lm_head, the modifier's defaults otherwise (static act-order, 1% dampening, blocks of
128 columns). GPTQ leaves each weight as its fake-quantized float values; those are saved to
``OUT/weights.safetensors`` and the timing to ``OUT/peer.json`` (``oneshot_seconds``: the call
alone; ``load_seconds``).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--ids", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--group-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the dtype the model is loaded in (its forward passes run in it)")
    args = parser.parse_args()

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    ids = torch.load(args.ids)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    load_seconds = time.perf_counter() - t0
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    weights = {"num_bits": 4, "type": "int", "symmetric": True,
               "strategy": "channel" if args.group_size is None else "group"}
    if args.group_size is not None:
        weights["group_size"] = args.group_size
    modifier = GPTQModifier(config_groups={"w4": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"])
    t0 = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=modifier, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False, batch_size=args.batch_size)
    seconds = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    linears = {f"{name}.weight": m.weight.detach().float().contiguous() for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name != "lm_head"}
    save_file(linears, str(out / "weights.safetensors"))
    (out / "peer.json").write_text(json.dumps({
        "oneshot_seconds": round(seconds, 2), "load_seconds": round(load_seconds, 2), "threads": torch.get_num_threads(),
        "batch_size": args.batch_size, "dtype": args.dtype, "group_size": args.group_size, "weights": weights,
        "llmcompressor": __import__("llmcompressor").__version__, "torch": torch.__version__}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
