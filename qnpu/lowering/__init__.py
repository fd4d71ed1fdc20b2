"""qnpu.lowering: quantized models executed by integer ops with torch_npu's names and semantics.

Importing this package registers ``torch.ops.qnpu.{npu_dynamic_quant, npu_quantize,
npu_quant_matmul, npu_weight_quant_batchmatmul, npu_trans_quant_param,
npu_convert_weight_to_int4pack}`` with bit-faithful reference kernels, and qnpu's own
``w4a8_matmul`` (the dense W4A8 op of the CATLASS kernels). `lower` turns a quantized
model into one that calls them. Imports qcore and torch only; torch_npu only in ``ascend``.
"""
from . import ops_matmul, ops_quant, ops_w4a8  # noqa: F401  (registers the ops)
from .encodings import decode_deq_scale, encode_deq_scale, fp19
from .exports import FORMATS, export
from .library import OpArgumentError
from .load_ascend_v1 import load_ascend_v1
from .lower import REGISTRY, TARGETS, check_target, lower, plan, quantized_linears, scheme_counts
from .modules import LoweredLinear, W4A8Linear, W4A8MatmulLinear, W8A8DynamicLinear, W8A8StaticLinear, WeightOnlyLinear
from .schemes import SCHEMES, LoweringError, classify

__all__ = ["export", "load_ascend_v1", "FORMATS", "lower", "plan", "check_target", "scheme_counts", "quantized_linears", "REGISTRY", "TARGETS", "SCHEMES", "LoweringError",
           "OpArgumentError", "classify", "fp19", "encode_deq_scale", "decode_deq_scale", "LoweredLinear",
           "W8A8StaticLinear", "W8A8DynamicLinear", "WeightOnlyLinear", "W4A8Linear", "W4A8MatmulLinear"]
