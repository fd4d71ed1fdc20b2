"""qnpu.qcore: the numerics every other layer stands on.

Formats, granularities and `QSpec`; `QTensor` with `quantize` / `dequantize` / `fake_quantize`;
`BiLLMTensor` / `MixedTensor`, the packed binarized and mixed-precision weights;
bit packing in the Ascend layouts; Hadamard matrices and fast transforms; error metrics.
Pure functions on tensors: imports only torch, numpy, scipy and the standard library.
"""
from .billm_tensor import BiLLMTensor
from .hadamard import (
    hadamard,
    hadamard_factors,
    hadamard_transform,
    is_hadamard_order,
    random_hadamard,
    random_hadamard_transform,
    random_signs,
)
from .layout import qparams_shape
from .mixed_tensor import MixedTensor
from .metrics import max_abs_error, mse, relative_output_error, sqnr_db
from .packing import (
    pack_bits,
    pack_int2,
    pack_int4,
    pack_bitstream,
    pack_int4_pairs,
    unpack_bits,
    unpack_bitstream,
    unpack_int2,
    unpack_int4,
    unpack_int4_pairs,
)
from .qtensor import QTensor, dequantize, zero_point_in_domain
from .qweights import PACKED_LAYOUTS, QWeight, is_packed, packed_from_tensors
from .quantize import check_finite, choose_qparams, fake_quantize, fake_quantize_ste, quantize
from .spec import FORMATS, GRANULARITIES, ZERO_POINT_DOMAINS, QSpec

__all__ = [
    "FORMATS", "GRANULARITIES", "ZERO_POINT_DOMAINS", "QSpec", "QTensor", "zero_point_in_domain", "BiLLMTensor",
    "MixedTensor", "QWeight", "PACKED_LAYOUTS", "is_packed", "packed_from_tensors",
    "check_finite", "choose_qparams", "quantize", "dequantize", "fake_quantize", "fake_quantize_ste",
    "qparams_shape",
    "pack_bits", "unpack_bits", "pack_int4", "unpack_int4", "pack_int2", "unpack_int2",
    "pack_int4_pairs", "unpack_int4_pairs", "pack_bitstream", "unpack_bitstream",
    "hadamard", "hadamard_factors", "hadamard_transform", "is_hadamard_order",
    "random_signs", "random_hadamard", "random_hadamard_transform",
    "mse", "max_abs_error", "sqnr_db", "relative_output_error",
]
