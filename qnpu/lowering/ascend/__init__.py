"""The Ascend target: torch_npu kernels behind the ``torch.ops.qnpu`` ops, imported lazily.

`enable` imports torch_npu (refusing clearly when it is missing) and registers, for the NPU
(``PrivateUse1``) dispatch key, a kernel per qnpu op that calls the torch_npu op of the same
name with the same arguments. A lowered model moved to ``npu`` then runs torch_npu's kernels;
its CPU copy still runs the reference. `check_layer` refuses what vllm-ascend / an Atlas A2
cannot run (docs/architecture.md, "Lowering").
"""
from __future__ import annotations

import importlib

import torch

from ..schemes import LoweringError

_ENABLED: set[str] = set()


def torch_npu_module():
    try:
        return importlib.import_module("torch_npu")
    except Exception as exc:  # ImportError, or CANN libraries missing at import time
        raise LoweringError("target 'ascend' needs torch_npu, which did not import "
                            f"({type(exc).__name__}: {exc}); on an Ascend host with CANN run "
                            "`pip install -e \".[npu]\"`, elsewhere use target='reference'") from None


def delegates(npu) -> dict:
    """``{op name: kernel}`` calling ``npu.<op>`` (torch_npu) with torch_npu's own argument names."""

    def dynamic_quant(x, *, smooth_scales=None, dst_type=None):
        kw = {} if dst_type is None else {"dst_type": dst_type}
        return npu.npu_dynamic_quant(x, smooth_scales=smooth_scales, **kw)

    def quantize(input, scales, zero_points, dtype, axis=1, div_mode=True):
        return npu.npu_quantize(input, scales, zero_points, dtype, axis, div_mode)

    def quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None, group_sizes=None):
        kw = {} if group_sizes is None else {"group_sizes": list(group_sizes)}
        return npu.npu_quant_matmul(x1, x2, scale, offset=offset, pertoken_scale=pertoken_scale, bias=bias,
                                    output_dtype=output_dtype, **kw)

    def weight_quant_batchmatmul(x, weight, antiquant_scale, antiquant_offset=None, quant_scale=None,
                                 quant_offset=None, bias=None, antiquant_group_size=0, inner_precise=0):
        return npu.npu_weight_quant_batchmatmul(x, weight, antiquant_scale, antiquant_offset=antiquant_offset,
                                                quant_scale=quant_scale, quant_offset=quant_offset, bias=bias,
                                                antiquant_group_size=antiquant_group_size, inner_precise=inner_precise)

    def trans_quant_param(scale, offset=None, round_mode=0):
        return npu.npu_trans_quant_param(scale, offset, round_mode)

    def convert_weight_to_int4pack(weight, inner_k_tiles=0):
        return npu.npu_convert_weight_to_int4pack(weight, inner_k_tiles)

    return {"npu_dynamic_quant": dynamic_quant, "npu_quantize": quantize, "npu_quant_matmul": quant_matmul,
            "npu_weight_quant_batchmatmul": weight_quant_batchmatmul, "npu_trans_quant_param": trans_quant_param,
            "npu_convert_weight_to_int4pack": convert_weight_to_int4pack}


def register_kernels(npu, dispatch_key: str = "PrivateUse1") -> torch.library.Library:
    """Register the torch_npu delegates for ``dispatch_key``, except for ops that already have a
    kernel there (the CATLASS library's, `kernels.load`); returns the library (keep it alive)."""
    from .kernels import has_kernel

    lib = torch.library.Library("qnpu", "IMPL")
    for name, fn in delegates(npu).items():
        if not has_kernel(name, dispatch_key):
            lib.impl(name, fn, dispatch_key)
    return lib


_LIBS = []


def enable() -> None:
    """Import torch_npu, load qnpu's CATLASS kernels when built (`kernels.load`) and install the
    torch_npu delegates for the remaining ops on the NPU dispatch key (once per process)."""
    npu = torch_npu_module()
    if "PrivateUse1" not in _ENABLED:
        from .kernels import load

        load()
        _LIBS.append(register_kernels(npu))
        _ENABLED.add("PrivateUse1")


def check_layer(label: str, module, scheme: str, dtype: torch.dtype) -> None:
    """Refuse, before any work, what vllm-ascend / torch_npu on an Atlas A2 cannot run."""
    torch_npu_module()
    if module.online_hadamard:
        raise LoweringError(f"{label}: an online Hadamard rotation has no Ascend op (vllm-ascend folds rotations "
                            "offline); use hadamard_rotation(online=False) or target='reference'")
    group = module.qweight.spec.group_size if module.qweight.spec.granularity == "group" else 0
    if scheme == "W4A8_DYNAMIC" and group not in (0, 256):
        from .kernels import has_kernel
        if not has_kernel("w4a8_matmul"):
            raise LoweringError(f"{label}: W4A8 with groups of {group} runs on qnpu's CATLASS kernel, which is not "
                                "loaded (torch_npu's A8W4 takes groups of 256 only): run `qnpu build-kernels`")
    if dtype not in (torch.float16, torch.bfloat16):
        raise LoweringError(f"{label}: torch_npu's quantized ops take float16/bfloat16 activations; the model is "
                            f"{dtype}: call model.to(torch.bfloat16) before lower(..., target='ascend')")
