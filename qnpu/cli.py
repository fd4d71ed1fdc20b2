"""The ``qnpu`` command.

Subcommands available now:
  qnpu info       versions and which accelerators (CUDA, Ascend NPU via torch_npu) are usable
  qnpu hadamard   whether an order n has a Hadamard matrix here, and how it is built
Every subcommand takes ``--json`` for machine-readable output.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys

import qnpu


def _info() -> dict:
    import torch

    return {
        "qnpu": qnpu.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda_available": bool(torch.cuda.is_available()),
        # find_spec, not import: importing torch_npu without CANN can abort the process.
        "torch_npu_installed": importlib.util.find_spec("torch_npu") is not None,
    }


def _hadamard(n: int) -> dict:
    from qnpu.qcore import hadamard_factors

    p2, m, how = hadamard_factors(n)
    return {"n": n, "power_of_two": p2, "core": m, "construction": how,
            "fast_cost_per_row": n * (p2.bit_length() - 1 + m)}


def _emit(data: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(data))
    else:
        width = max(len(k) for k in data)
        for key, value in data.items():
            print(f"{key:<{width}}  {value}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qnpu", description="Functional post-training quantization "
                                     "for LLMs, lowered to Ascend NPUs.")
    parser.add_argument("--version", action="version", version=f"qnpu {qnpu.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p_info = sub.add_parser("info", help="show versions and available accelerators")
    p_info.add_argument("--json", action="store_true", help="print one JSON object")
    p_h = sub.add_parser("hadamard", help="show how a Hadamard matrix of order N is constructed")
    p_h.add_argument("n", type=int, help="matrix order")
    p_h.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        data = _info() if args.command == "info" else _hadamard(args.n)
    except ValueError as err:
        print(f"qnpu {args.command}: error: {err}", file=sys.stderr)
        return 2
    _emit(data, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
