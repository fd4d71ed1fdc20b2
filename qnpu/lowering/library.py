"""The ``torch.ops.qnpu`` namespace: torch_npu's quantization ops, by their own names and schemas.

Schemas follow torch_npu 2.13.0 (``_op_plugin_docs.py`` and ``op_plugin/meta/_meta_registrations.py``)
for every argument qnpu uses; arguments that only select features the reference does not
implement (MoE ``group_index``, the fp8 / mx ``*_dtype`` selectors) are left out rather than
accepted and ignored. Each op gets:

* a ``CompositeExplicitAutograd`` kernel: the plain-torch reference, so CPU and CUDA tensors run it;
* a fake kernel (``register_fake``) for ``torch.compile`` tracing;
* on an Ascend host, a ``PrivateUse1`` kernel that delegates to torch_npu (``lowering.ascend``).

See docs/architecture.md, "Lowering".
"""
from __future__ import annotations

import torch

NAMESPACE = "qnpu"

SCHEMAS = {
    "npu_dynamic_quant": "npu_dynamic_quant(Tensor x, *, Tensor? smooth_scales=None, ScalarType? dst_type=None) "
                         "-> (Tensor, Tensor)",
    "npu_quantize": "npu_quantize(Tensor input, Tensor scales, Tensor? zero_points, ScalarType dtype, int axis=1, "
                    "bool div_mode=True) -> Tensor",
    "npu_quant_matmul": "npu_quant_matmul(Tensor x1, Tensor x2, Tensor scale, *, Tensor? offset=None, "
                        "Tensor? pertoken_scale=None, Tensor? bias=None, ScalarType? output_dtype=None, "
                        "int[]? group_sizes=None) -> Tensor",
    "npu_weight_quant_batchmatmul": "npu_weight_quant_batchmatmul(Tensor x, Tensor weight, Tensor antiquant_scale, "
                                    "Tensor? antiquant_offset=None, Tensor? quant_scale=None, "
                                    "Tensor? quant_offset=None, Tensor? bias=None, int antiquant_group_size=0, "
                                    "int inner_precise=0) -> Tensor",
    "npu_trans_quant_param": "npu_trans_quant_param(Tensor scale, Tensor? offset=None, int? round_mode=0) -> Tensor",
    "npu_convert_weight_to_int4pack": "npu_convert_weight_to_int4pack(Tensor weight, int inner_k_tiles=0) -> Tensor",
    # qnpu's own op (no torch_npu counterpart): the dense W4A8 matmul of the CATLASS extension
    # (qnpu/lowering/ascend/csrc), per-channel or per-group weight scales of any group size.
    "w4a8_matmul": "w4a8_matmul(Tensor x1, Tensor x2, Tensor scale, Tensor pertoken_scale, *, Tensor? bias=None, "
                   "int group_size=0, ScalarType? output_dtype=None) -> Tensor",
}

_LIB = torch.library.Library(NAMESPACE, "DEF")
for _schema in SCHEMAS.values():
    _LIB.define(_schema)


def register(name: str, reference, fake) -> None:
    """Install ``reference`` as the device-generic kernel of ``qnpu::name`` and ``fake`` as its fake kernel."""
    _LIB.impl(name, reference, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_LIB)


class OpArgumentError(ValueError):
    """An argument torch_npu would reject (or the reference does not implement), named with its constraint."""


def require(cond: bool, op: str, message: str) -> None:
    if not cond:
        raise OpArgumentError(f"qnpu.{op}: {message}")


def float_dtypes(op: str, dtype: torch.dtype, what: str) -> None:
    """torch_npu takes float16/bfloat16 activations; float32 is a reference-only extension."""
    require(dtype in (torch.float16, torch.bfloat16, torch.float32), op,
            f"{what} must be float16 or bfloat16 (float32 is accepted by the reference only); got {dtype}")
