"""Reference kernel of ``qnpu::w4a8_matmul``: dense per-token W4A8, qnpu's own op.

torch_npu's A8W4 ``npu_quant_matmul`` fixes the group size at 256 and folds an MSD offset into
its arguments; this op is the plain contract the CATLASS kernels of ``lowering/ascend/csrc``
implement for any group size (docs/architecture.md, "CATLASS kernels"):

    y[m, n] = pertoken[m] * sum_g scale[g, n] * sum_{k in g} x1[m, k] * W[k, n]  (+ bias[n])

``x1`` int8 ``(m, k)`` (``npu_dynamic_quant`` codes), ``x2`` int32 ``(k, n/8)`` from
``npu_convert_weight_to_int4pack`` (eight int4 along n, element ``i`` in bits ``4i..4i+3``),
``scale`` float32 ``(n,)`` when ``group_size == 0`` (per channel) or ``(k / group_size, n)``,
``pertoken_scale`` float32 ``(m,)``, ``bias`` float32 ``(n,)``.

Rounding of the reference: per channel, the exact int32 dot product is rounded once to fp32 and
then multiplied by ``scale`` and ``pertoken`` in fp32 (bit-identical to the per-token int8
``npu_quant_matmul`` on widened weights); per group, the group sums are combined exactly (float64)
and rounded once to fp32. The kernel's own rounding (fp16 group accumulation) is modelled by
``lowering.ascend.kernel_model`` and bounded against this reference in the tests.
"""
from __future__ import annotations

import torch

from qnpu.qcore import unpack_int4

from .library import register, require
from .ops_matmul import EXACT_CHUNK, MAX_DIM, _cast_out, _int_matmul

GROUP_STEP = 32          # the int8 cube's K fractal: a group must hold whole fractals
_OUT = (torch.float16, torch.bfloat16, torch.float32)


def _check(x1, x2, scale, pertoken_scale, bias, group_size, output_dtype):
    op = "w4a8_matmul"
    require(x1.dtype == torch.int8 and x1.dim() == 2, op, f"x1 must be 2-d int8 (m, k); got {x1.dtype} {tuple(x1.shape)}")
    require(x2.dtype == torch.int32 and x2.dim() == 2, op,
            f"x2 must be 2-d int32 (k, n/8) from npu_convert_weight_to_int4pack; got {x2.dtype} {tuple(x2.shape)}")
    m, k = x1.shape
    n = x2.shape[1] * 8
    require(x2.shape[0] == k, op, f"x1 is (m, k)=({m}, {k}) but x2 has {x2.shape[0]} rows")
    require(0 < k <= MAX_DIM and 0 < n <= MAX_DIM, op, f"k ({k}) and n ({n}) must lie in [1, {MAX_DIM}]")
    if group_size == 0:
        want = (n,)
    else:
        require(group_size % GROUP_STEP == 0 and group_size <= k, op,
                f"group_size ({group_size}) must be a multiple of {GROUP_STEP} up to k ({k}), or 0 (per channel)")
        require(k % group_size == 0, op, f"k ({k}) must be a multiple of group_size ({group_size})")
        want = (k // group_size, n)
    require(scale.dtype == torch.float32 and tuple(scale.shape) == want, op,
            f"scale must be float32 of shape {want}; got {scale.dtype} {tuple(scale.shape)}")
    require(pertoken_scale.dtype == torch.float32 and tuple(pertoken_scale.shape) == (m,), op,
            f"pertoken_scale must be float32 of shape (m,)=({m},); got {pertoken_scale.dtype} "
            f"{tuple(pertoken_scale.shape)}")
    require(bias is None or bias.dtype == torch.float32 and tuple(bias.shape) == (n,), op,
            f"bias must be float32 of shape (n,)=({n},); got "
            f"{None if bias is None else (bias.dtype, tuple(bias.shape))}")
    out = torch.float16 if output_dtype is None else output_dtype
    require(out in _OUT, op, f"output_dtype must be torch.float16 or torch.bfloat16 (torch.float32: reference only); "
            f"got {output_dtype}")
    return (m, n), out


def w4a8_matmul(x1, x2, scale, pertoken_scale, *, bias=None, group_size=0, output_dtype=None):
    """Dense per-token W4A8 matmul (module docstring)."""
    _, out = _check(x1, x2, scale, pertoken_scale, bias, group_size, output_dtype)
    w = unpack_int4(x2, dim=-1)
    if group_size == 0:
        y = _int_matmul(x1, w).to(torch.float32) * scale
    elif group_size <= EXACT_CHUNK:          # every group's sum of <= 1024 int8 x int4 products is exact in fp32
        groups, m = scale.shape[0], x1.shape[0]
        xs = x1.to(torch.float32).reshape(m, groups, group_size).transpose(0, 1)
        parts = torch.bmm(xs, w.to(torch.float32).reshape(groups, group_size, -1))        # (G, m, n) integers
        y = (parts.to(torch.float64) * scale.to(torch.float64).unsqueeze(1)).sum(0).to(torch.float32)
    else:
        acc = None
        for g in range(scale.shape[0]):
            ks = slice(g * group_size, (g + 1) * group_size)
            part = _int_matmul(x1[:, ks], w[ks]) * scale[g].to(torch.float64)
            acc = part if acc is None else acc + part
        y = acc.to(torch.float32)
    y = y * pertoken_scale.unsqueeze(-1)
    if bias is not None:
        y = y + bias
    return _cast_out(y, out)


def _fake(x1, x2, scale, pertoken_scale, *, bias=None, group_size=0, output_dtype=None):
    shape, out = _check(x1, x2, scale, pertoken_scale, bias, group_size, output_dtype)
    return x1.new_empty(shape, dtype=out)


register("w4a8_matmul", w4a8_matmul, _fake)
