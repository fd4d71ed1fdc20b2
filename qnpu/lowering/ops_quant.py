"""Reference kernels of the activation-quantization and parameter-encoding ops.

Rounding is half-to-even (the Ascend ``CAST_RINT``), i.e. ``torch.round``; integer outputs
saturate to the output type's range **[derived: documented for the cast unit, not per op]**.
"""
from __future__ import annotations

import torch

from qnpu.qcore import pack_int4

from .encodings import encode_deq_scale
from .library import float_dtypes, register, require

_INT8 = (torch.int8, torch.qint8)
_ONE_OVER_127 = torch.tensor(1.0 / 127.0, dtype=torch.float32)


# -- npu_dynamic_quant -------------------------------------------------------------------------
def _check_dynamic_quant(x, smooth_scales, dst_type):
    op = "npu_dynamic_quant"
    float_dtypes(op, x.dtype, "x")
    require(x.dim() > 1, op, f"x must have more than 1 dimension; got shape {tuple(x.shape)}")
    require(dst_type is None or dst_type in _INT8, op,
            f"dst_type={dst_type} is not implemented by the reference; allowed: torch.int8 (torch.quint4x2 is "
            "an NPU-only int4 output)")
    if smooth_scales is not None:
        require(smooth_scales.dim() == 1 and smooth_scales.shape[0] == x.shape[-1], op,
                f"smooth_scales must be 1-d with x.shape[-1]={x.shape[-1]} values; got {tuple(smooth_scales.shape)}")
        require(smooth_scales.dtype == x.dtype, op,
                f"smooth_scales must have x's dtype {x.dtype}; got {smooth_scales.dtype}")


def npu_dynamic_quant(x, *, smooth_scales=None, dst_type=None):
    """torch_npu.npu_dynamic_quant: per-token symmetric int8 (ops-nn ``dynamic_quant``).

    Order of operations, all in fp32 (torch_npu 2.13.0 docs; kernel ``dynamic_quant_single_row``):
    ``xf = f32(x) * f32(smooth)``; ``amax = max_row |xf|``; ``scale = amax * f32(1/127)``;
    ``q = sat_int8(rint(xf * (f32(127) / amax)))``. The codes use ``127/amax``, which is not
    exactly ``1/scale``. Returns ``(q int8, shape of x; scale fp32, shape x.shape[:-1])``. A row of
    zeros gives scale 0 and codes 0 **[derived: the kernel's 0/0 case is undocumented]**.
    """
    _check_dynamic_quant(x, smooth_scales, dst_type)
    xf = x.to(torch.float32)
    if smooth_scales is not None:
        xf = xf * smooth_scales.to(torch.float32)
    amax = xf.abs().amax(dim=-1)
    scale = amax * _ONE_OVER_127.to(x.device)
    inv = torch.where(amax > 0, torch.tensor(127.0, dtype=torch.float32, device=x.device) / amax,
                      torch.zeros_like(amax))
    q = torch.clamp(torch.round(xf * inv.unsqueeze(-1)), -128, 127).to(torch.int8)
    return q, scale


def _fake_dynamic_quant(x, *, smooth_scales=None, dst_type=None):
    _check_dynamic_quant(x, smooth_scales, dst_type)
    return torch.empty_like(x, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


# -- npu_quantize ----------------------------------------------------------------------------
_QUANTIZE_OUT = {torch.qint8: torch.int8, torch.int8: torch.int8, torch.quint8: torch.uint8, torch.uint8: torch.uint8,
                 torch.int32: torch.int32, torch.qint32: torch.int32}


def _quantize_axis(x, axis, div_mode):
    if div_mode:
        require(-x.dim() <= axis < x.dim(), "npu_quantize", f"axis={axis} is out of range for a {x.dim()}-d input")
        return axis % x.dim()
    require(axis >= -2 and axis < x.dim(), "npu_quantize",
            f"axis={axis}: with div_mode=False axis must lie in [-2, input.dim()) (-2: second-last axis, "
            "anything larger: the last axis)")
    return x.dim() - 2 if axis == -2 else x.dim() - 1


def _check_quantize(x, scales, zero_points, dtype, axis, div_mode):
    op = "npu_quantize"
    require(x.dtype in (torch.float32, torch.float16, torch.bfloat16), op,
            f"input must be float32, float16 or bfloat16; got {x.dtype}")
    require(dtype in _QUANTIZE_OUT, op, f"dtype={dtype} is not implemented by the reference; allowed: "
            "torch.qint8, torch.quint8, torch.int32 (torch.quint4x2 is an NPU-only int4 output)")
    require(div_mode or _QUANTIZE_OUT[dtype] == torch.int8, op,
            f"dtype={dtype} needs div_mode=True; with div_mode=False torch_npu supports torch.qint8 and torch.quint4x2")
    ax = _quantize_axis(x, axis, div_mode)
    ok_scale = (torch.float32, torch.bfloat16) if div_mode else (torch.float32, torch.float16, torch.bfloat16)
    require(scales.dtype in ok_scale, op, f"scales must be one of {ok_scale} when div_mode={div_mode}; got {scales.dtype}")
    for name, t in (("scales", scales), ("zero_points", zero_points)):
        if t is None:
            continue
        if t.dim() == 1:
            require(t.shape[0] in (1, x.shape[ax]), op,
                    f"1-d {name} must have 1 or input.shape[{ax}]={x.shape[ax]} values; got {t.shape[0]}")
        else:
            require(t.dim() == x.dim() and all(n == 1 or i == ax for i, n in enumerate(t.shape))
                    and t.shape[ax] in (1, x.shape[ax]), op,
                    f"multi-dim {name} must have input's rank with size 1 except on axis {ax}; got {tuple(t.shape)}")
    if zero_points is not None:
        if div_mode:
            require(zero_points.dtype in (torch.int8, torch.uint8, torch.int32, torch.bfloat16), op,
                    f"zero_points must be int8, uint8, int32 or bfloat16 when div_mode=True; got {zero_points.dtype}")
        else:
            require(zero_points.dtype == scales.dtype and zero_points.shape == scales.shape, op,
                    "zero_points must have the shape and dtype of scales when div_mode=False; got "
                    f"{tuple(zero_points.shape)} {zero_points.dtype} vs {tuple(scales.shape)} {scales.dtype}")
    return ax


def _along(t, x, ax):
    if t.dim() == 1:
        shape = [1] * x.dim()
        shape[ax] = t.shape[0]
        return t.to(torch.float32).reshape(shape)
    return t.to(torch.float32)


def npu_quantize(input, scales, zero_points, dtype, axis=1, div_mode=True):
    """torch_npu.npu_quantize: static quantization with per-axis (or per-tensor) scales.

    torch_npu 2.13.0 docs: ``div_mode=True``: ``y = input / scales + zero_points``;
    ``div_mode=False``: ``y = input * scales + zero_points`` with float ``zero_points`` of the
    shape and dtype of ``scales``. Computed in fp32 from the given (already rounded) scales, then
    ``rint`` and a saturating cast to ``dtype`` **[derived: fp32 compute and saturation]**.
    ``axis`` names the scaled axis (``div_mode=False``: -2 is the second-last axis and any larger
    value the last one). vllm-ascend's W8A8 static call: ``(x, 1/input_scale in x.dtype,
    input_offset in x.dtype, torch.qint8, -1, False)``.
    """
    ax = _check_quantize(input, scales, zero_points, dtype, axis, div_mode)
    xf = input.to(torch.float32)
    s = _along(scales, input, ax)
    y = xf / s if div_mode else xf * s
    if zero_points is not None:
        y = y + _along(zero_points, input, ax)
    out = _QUANTIZE_OUT[dtype]
    info = torch.iinfo(out)
    return torch.clamp(torch.round(y), info.min, info.max).to(out)


def _fake_quantize(input, scales, zero_points, dtype, axis=1, div_mode=True):
    _check_quantize(input, scales, zero_points, dtype, axis, div_mode)
    return torch.empty_like(input, dtype=_QUANTIZE_OUT[dtype])


# -- npu_trans_quant_param -------------------------------------------------------------------
def _check_trans(scale, offset, round_mode):
    op = "npu_trans_quant_param"
    require(scale.dtype == torch.float32, op, f"scale must be float32; got {scale.dtype}")
    require(scale.dim() == 1 or (scale.dim() == 2 and scale.shape[0] == 1), op,
            f"scale must have shape (t,) or (1, n); got {tuple(scale.shape)}")
    require(round_mode in (0, 1), op, f"round_mode={round_mode} is invalid; allowed: 0 (truncate), 1 (R_INT)")
    if offset is None:
        return tuple(scale.shape)
    require(offset.dtype == torch.float32, op, f"offset must be float32; got {offset.dtype}")
    if scale.dim() == 2:
        require(offset.shape == scale.shape, op, f"with a (1, n) scale, offset must have the same shape; "
                f"got {tuple(offset.shape)} vs {tuple(scale.shape)}")
        return tuple(scale.shape)
    require(offset.dim() == 1, op, f"offset must be 1-d like scale; got {tuple(offset.shape)}")
    t, u = scale.shape[0], offset.shape[0]
    require(t == 1 or u == 1 or t == u, op, f"offset has {u} values and scale {t}; they must match unless one is 1")
    return (max(t, u),)


def npu_trans_quant_param(scale, offset=None, round_mode=0):
    """torch_npu.npu_trans_quant_param: fp32 scale (+ offset) -> the int64 deq-scale word.

    ``word = fp19_bits(scale) | 1 << 46 | (clamp(rint(offset), -256, 255) & 0x1FF) << 37`` (see
    `qnpu.lowering.encodings`); ``round_mode=0`` truncates the scale to its top 19 bits.
    """
    shape = _check_trans(scale, offset, round_mode)
    s = scale.expand(shape) if scale.dim() == 1 else scale
    o = None if offset is None else (offset.expand(shape) if offset.dim() == 1 else offset)
    return encode_deq_scale(s, o, int(round_mode))


def _fake_trans(scale, offset=None, round_mode=0):
    return scale.new_empty(_check_trans(scale, offset, round_mode), dtype=torch.int64)


# -- npu_convert_weight_to_int4pack -----------------------------------------------------------
def _check_int4pack(weight):
    op = "npu_convert_weight_to_int4pack"
    require(weight.dtype == torch.int32, op, f"weight must be int32; got {weight.dtype}")
    require(weight.dim() == 2, op, f"weight must be 2-d (k, n) or (n, k); got shape {tuple(weight.shape)}")
    require(weight.shape[-1] % 8 == 0, op, f"the last dim ({weight.shape[-1]}) must be a multiple of 8")
    require(weight.is_contiguous(), op, "weight must be contiguous")


def npu_convert_weight_to_int4pack(weight, inner_k_tiles=0):
    """torch_npu.npu_convert_weight_to_int4pack: int32 values in [-8, 7], shape ``(k, n)`` ->
    int32 ``(k, n/8)``, eight int4 per word along the last dim, element ``i`` in bits ``[4i, 4i+3]``."""
    _check_int4pack(weight)
    if weight.numel():
        lo, hi = int(weight.min()), int(weight.max())
        require(lo >= -8 and hi <= 7, "npu_convert_weight_to_int4pack",
                f"values must lie in the int4 range [-8, 7]; got [{lo}, {hi}]")
    return pack_int4(weight, dim=-1)


def _fake_int4pack(weight, inner_k_tiles=0):
    _check_int4pack(weight)
    return weight.new_empty((weight.shape[0], weight.shape[1] // 8), dtype=torch.int32)


register("npu_dynamic_quant", npu_dynamic_quant, _fake_dynamic_quant)
register("npu_quantize", npu_quantize, _fake_quantize)
register("npu_trans_quant_param", npu_trans_quant_param, _fake_trans)
register("npu_convert_weight_to_int4pack", npu_convert_weight_to_int4pack, _fake_int4pack)
