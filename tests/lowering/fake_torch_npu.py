"""A stand-in for ``torch_npu`` 2.13.0, for tests only (no Ascend hardware or CANN needed).

Insert it as ``sys.modules["torch_npu"]``. Each of the six quantization ops qnpu delegates to has
torch_npu 2.13.0's Python signature (names, keyword-only markers, defaults) and, before doing
anything, checks its arguments against the dtype / shape rules torch_npu documents for Atlas A2
(``_op_plugin_docs.py``) and enforces in its meta kernels (``op_plugin/meta/_meta_registrations.py``).
These checks are written here independently of qnpu's own argument checks, and are stricter where
qnpu's reference is more permissive (float32 activations, for instance, which torch_npu rejects).

A call that passes the checks is appended to `CALLS` (op name, then each argument as dtype /
shape or value) and computed by qnpu's reference *Python function* (``qnpu.lowering.ops_quant`` /
``ops_matmul``), never through ``torch.ops.qnpu``: the stand-in may itself be registered as the
kernel of those ops (``qnpu.lowering.ascend.register_kernels``) and must not recurse. Results are
checked against the output dtype / shape torch_npu documents.

Features that torch_npu has but the reference does not implement (MoE ``group_index``, int4 /
fp8 / mx outputs, ``quant_scale`` output quantization, ...) raise `NotImplementedError` after the
checks; arguments torch_npu itself would reject raise `NpuArgumentError`.
"""
from __future__ import annotations

import math

import torch

from qnpu.lowering import ops_matmul, ops_quant

__version__ = "2.13.0+fake"

CALLS: list[dict] = []
MAX_DIM = 65535
A8W4_GROUP = 256
_FLOAT16S = (torch.float16, torch.bfloat16)


class NpuArgumentError(RuntimeError):
    """An argument torch_npu 2.13.0 would refuse (torch_npu raises RuntimeError from ``torch._check``)."""


def reset() -> None:
    CALLS.clear()


def _need(cond: bool, op: str, message: str) -> None:
    if not cond:
        raise NpuArgumentError(f"fake torch_npu.{op}: {message}")


def _unsupported(op: str, what: str):
    raise NotImplementedError(f"fake torch_npu.{op}: {what} is valid for torch_npu but not modelled by "
                              "the stand-in (qnpu's reference does not implement it)")


def _is_tensor(t) -> bool:
    return isinstance(t, torch.Tensor)


def _tensor(op: str, name: str, t, optional: bool = False) -> None:
    if t is None and optional:
        return
    _need(_is_tensor(t), op, f"{name} must be a Tensor; got {type(t).__name__}")


def _describe(v):
    """A JSON-friendly record of one argument."""
    if _is_tensor(v):
        return {"dtype": str(v.dtype), "shape": list(v.shape)}
    if isinstance(v, torch.dtype):
        return str(v)
    if isinstance(v, (list, tuple)):
        return [_describe(a) for a in v]
    return v


def _record(op: str, args: dict, out) -> None:
    outs = out if isinstance(out, tuple) else (out,)
    CALLS.append({"op": op, "args": {k: _describe(v) for k, v in args.items()},
                  "out": [_describe(o) for o in outs]})


def _same_device(op: str, *tensors) -> None:
    devices = {t.device for t in tensors if _is_tensor(t)}
    _need(len(devices) <= 1, op, f"all tensors must be on one device; got {sorted(map(str, devices))}")


def _post(op: str, out: torch.Tensor, dtype: torch.dtype, shape) -> torch.Tensor:
    """The result has the dtype / shape torch_npu documents for these arguments."""
    _need(out.dtype == dtype and tuple(out.shape) == tuple(shape), op,
          f"the reference returned {out.dtype} {tuple(out.shape)}; torch_npu returns {dtype} {tuple(shape)}")
    return out


# -- npu_dynamic_quant -------------------------------------------------------------------------
# The first argument is positional-only here: the docs name it ``x`` and the C++ binding ``input``,
# so a caller passing it by keyword would depend on which name the real build exposes.
def npu_dynamic_quant(x, /, *, smooth_scales=None, group_index=None, dst_type=None, quant_mode="pertoken",
                      dst_type_max=0.0):
    op = "npu_dynamic_quant"
    _tensor(op, "x", x)
    _need(x.dtype in _FLOAT16S, op, f"x must be float16 or bfloat16; got {x.dtype}")
    _need(x.dim() >= 2, op, f"x needs at least 2 dims; got {tuple(x.shape)}")
    _need(x.numel() > 0, op, "x must not be empty")
    _need(dst_type in (None, torch.int8, torch.quint4x2), op,
          f"dst_type must be None, torch.int8 or torch.quint4x2; got {dst_type}")
    _need(quant_mode in ("pertoken", "pertensor", "perchannel"), op, f"unknown quant_mode {quant_mode!r}")
    _tensor(op, "smooth_scales", smooth_scales, optional=True)
    _tensor(op, "group_index", group_index, optional=True)
    if smooth_scales is not None:
        _need(smooth_scales.dtype == x.dtype, op,
              f"smooth_scales must have x's dtype {x.dtype} (eager mode); got {smooth_scales.dtype}")
        if group_index is None:
            _need(smooth_scales.dim() == 1 and smooth_scales.shape[0] == x.shape[-1], op,
                  f"smooth_scales must be 1-d of size x.shape[-1]={x.shape[-1]}; got {tuple(smooth_scales.shape)}")
    if group_index is not None:
        _need(group_index.dtype == torch.int32 and group_index.dim() == 1, op, "group_index must be 1-d int32")
    if dst_type == torch.quint4x2:
        _need(x.shape[-1] % 8 == 0, op, f"an int4 output needs x.shape[-1] % 8 == 0; got {x.shape[-1]}")
    _same_device(op, x, smooth_scales, group_index)
    if group_index is not None:
        _unsupported(op, "group_index (MoE smoothing)")
    if dst_type == torch.quint4x2:
        _unsupported(op, "dst_type=torch.quint4x2")
    if quant_mode != "pertoken" or dst_type_max != 0.0:
        _unsupported(op, f"quant_mode={quant_mode!r} / dst_type_max={dst_type_max}")
    kw = {} if dst_type is None else {"dst_type": dst_type}
    y, scale = ops_quant.npu_dynamic_quant(x, smooth_scales=smooth_scales, **kw)
    _post(op, y, torch.int8, x.shape)
    _post(op, scale, torch.float32, x.shape[:-1])
    _record(op, dict(x=x, smooth_scales=smooth_scales, group_index=group_index, dst_type=dst_type,
                     quant_mode=quant_mode, dst_type_max=dst_type_max), (y, scale))
    return y, scale


# -- npu_quantize ------------------------------------------------------------------------------
_QUANTIZE_DIV = {torch.qint8: torch.int8, torch.quint8: torch.uint8, torch.int32: torch.int32}


def _scale_along(op, name, t, x, ax, exact=False):
    """1-d: size 1 or x.shape[ax]; multi-d: x's rank, 1 everywhere but ``ax``."""
    if t.dim() == 1:
        ok = t.shape[0] == x.shape[ax] or (not exact and t.shape[0] == 1)
        _need(ok, op, f"1-d {name} must have {'' if exact else '1 or '}input.shape[{ax}]={x.shape[ax]} "
              f"elements; got {t.shape[0]}")
    else:
        _need(t.dim() == x.dim(), op, f"a multi-dim {name} must have input's rank {x.dim()}; got {tuple(t.shape)}")
        _need(all(s == 1 for i, s in enumerate(t.shape) if i != ax), op,
              f"{name} must be 1 on every axis but {ax}; got {tuple(t.shape)}")
        _need(t.shape[ax] in (1, x.shape[ax]), op, f"{name}.shape[{ax}] must be 1 or {x.shape[ax]}; got {t.shape[ax]}")


def npu_quantize(input, scales, zero_points, dtype, axis=1, div_mode=True):
    op = "npu_quantize"
    _tensor(op, "input", input)
    _tensor(op, "scales", scales)
    _tensor(op, "zero_points", zero_points, optional=True)
    _need(isinstance(dtype, torch.dtype), op, f"dtype must be a torch dtype; got {dtype!r}")
    _need(isinstance(axis, int) and not isinstance(axis, bool), op, f"axis must be an int; got {axis!r}")
    _need(isinstance(div_mode, bool), op, f"div_mode must be a bool; got {div_mode!r}")
    _need(input.dtype in (torch.float32, *_FLOAT16S), op, f"input must be float32, float16 or bfloat16; got {input.dtype}")
    _need(input.dim() >= 1, op, "input must have at least one dim")
    if div_mode:
        _need(dtype in _QUANTIZE_DIV, op, f"with div_mode=True dtype must be torch.qint8, torch.quint8 or "
              f"torch.int32; got {dtype}")
        _need(scales.dtype in (torch.float32, torch.bfloat16), op,
              f"with div_mode=True scales must be float32 or bfloat16; got {scales.dtype}")
        _need(-input.dim() <= axis < input.dim(), op, f"axis={axis} is out of range for a {input.dim()}-d input")
        ax = axis % input.dim()
        _scale_along(op, "scales", scales, input, ax)
        if zero_points is not None:
            _need(zero_points.dtype in (torch.int8, torch.uint8, torch.int32, torch.bfloat16), op,
                  f"with div_mode=True zero_points must be int8, uint8, int32 or bfloat16; got {zero_points.dtype}")
            _scale_along(op, "zero_points", zero_points, input, ax)
        out = _QUANTIZE_DIV[dtype]
    else:
        _need(dtype in (torch.qint8, torch.quint4x2), op,
              f"with div_mode=False dtype must be torch.qint8 or torch.quint4x2; got {dtype}")
        _need(scales.dtype in (torch.float32, *_FLOAT16S), op,
              f"with div_mode=False scales must be float32, float16 or bfloat16; got {scales.dtype}")
        _need(-2 <= axis < input.dim(), op, f"with div_mode=False axis must lie in [-2, {input.dim()}); got {axis}")
        _need(input.dim() >= 2 or axis != -2, op, "axis=-2 needs an input of at least 2 dims")
        ax = input.dim() - 2 if axis == -2 else input.dim() - 1
        _scale_along(op, "scales", scales, input, ax)
        if zero_points is not None:
            _need(zero_points.dtype == scales.dtype and zero_points.shape == scales.shape, op,
                  f"with div_mode=False zero_points must have scales' shape and dtype {tuple(scales.shape)} "
                  f"{scales.dtype}; got {tuple(zero_points.shape)} {zero_points.dtype}")
        if dtype == torch.quint4x2:
            _need(input.shape[-1] % 8 == 0, op, f"an int4 output needs input.shape[-1] % 8 == 0; got {input.shape[-1]}")
        out = torch.int8
    _same_device(op, input, scales, zero_points)
    if dtype == torch.quint4x2:
        _unsupported(op, "dtype=torch.quint4x2")
    y = ops_quant.npu_quantize(input, scales, zero_points, dtype, axis, div_mode)
    _post(op, y, out, input.shape)
    _record(op, dict(input=input, scales=scales, zero_points=zero_points, dtype=dtype, axis=axis,
                     div_mode=div_mode), y)
    return y


# -- npu_quant_matmul --------------------------------------------------------------------------
# Atlas A2 combinations for int8 x int8 (docs, table of supported dtypes): per output dtype, the
# scale dtypes, whether offset may be given, the bias dtypes and whether pertoken_scale is
# forbidden / optional / required.
_NO, _OPT, _REQ = "forbidden", "optional", "required"
_INT8_ROWS = (
    dict(out=torch.float16, scale={torch.int64, torch.float32}, offset=_NO, bias={torch.int32}, pertoken=_NO),
    dict(out=torch.float16, scale={torch.float32}, offset=_NO, bias={torch.int32, torch.float16, torch.float32},
         pertoken=_REQ),
    dict(out=torch.int8, scale={torch.int64, torch.float32}, offset=_OPT, bias={torch.int32}, pertoken=_NO),
    dict(out=torch.bfloat16, scale={torch.float32, torch.bfloat16}, offset=_NO,
         bias={torch.int32, torch.bfloat16, torch.float32}, pertoken=_OPT),
    dict(out=torch.int32, scale={torch.float32, torch.bfloat16}, offset=_NO, bias={torch.int32}, pertoken=_NO),
)


def _row_fits(row, out, scale, offset, pertoken_scale, bias) -> bool:
    has_pt = pertoken_scale is not None
    return (row["out"] == out and scale.dtype in row["scale"]
            and (offset is None or row["offset"] == _OPT)
            and (bias is None or bias.dtype in row["bias"])
            and (row["pertoken"] == _OPT or has_pt == (row["pertoken"] == _REQ)))


def _check_int8_matmul(op, x1, x2, scale, offset, pertoken_scale, bias, output_dtype, group_sizes):
    _need(2 <= x1.dim() <= 6 and 2 <= x2.dim() <= 6, op, f"x1 and x2 need 2 to 6 dims; got {x1.dim()} and {x2.dim()}")
    m, k, n = x1.shape[-2], x1.shape[-1], x2.shape[-1]
    _need(x2.shape[-2] == k, op, f"x1 (..., m, k={k}) and x2 (..., k, n) disagree on k: x2 is {tuple(x2.shape)}")
    _need(k <= MAX_DIM and n <= MAX_DIM, op, f"k={k} and n={n} must not exceed {MAX_DIM}")
    batch = []
    b1, b2 = list(x1.shape[:-2]), list(x2.shape[:-2])
    width = max(len(b1), len(b2))
    b1, b2 = [1] * (width - len(b1)) + b1, [1] * (width - len(b2)) + b2
    for d1, d2 in zip(b1, b2):
        _need(d1 == d2 or d1 == 1 or d2 == 1, op, f"batch dims {x1.shape[:-2]} and {x2.shape[:-2]} do not broadcast")
        batch.append(max(d1, d2))
    out = torch.int8 if output_dtype is None else output_dtype
    _need(out in (torch.int8, torch.float16, torch.bfloat16, torch.int32), op,
          f"output_dtype must be None, torch.int8, torch.float16, torch.bfloat16 or torch.int32; got {output_dtype}")
    if group_sizes is not None:
        _need(len(group_sizes) == 3, op, f"group_sizes must have 3 entries; got {group_sizes}")
    if group_sizes is None or not any(group_sizes):
        _need(scale.dim() == 1 and scale.shape[0] in (1, n), op, f"scale must be 1-d (1,) or (n,)=({n},); got "
              f"{tuple(scale.shape)}")
        if pertoken_scale is not None:
            _need(pertoken_scale.dim() == 1 and pertoken_scale.shape[0] == m, op,
                  f"int8 x int8 pertoken_scale must be 1-d (m,)=({m},); got {tuple(pertoken_scale.shape)}")
    if offset is not None:
        _need(offset.dtype == torch.float32, op, f"offset must be float32; got {offset.dtype}")
        _need(offset.dim() == 1 and offset.shape[0] in (1, n), op, f"offset must be (1,) or (n,)=({n},); got "
              f"{tuple(offset.shape)}")
    if pertoken_scale is not None:
        _need(pertoken_scale.dtype == torch.float32, op, f"pertoken_scale must be float32; got {pertoken_scale.dtype}")
    _need(scale.dtype != torch.bfloat16 or out in (torch.bfloat16, torch.int32), op,
          f"a bfloat16 scale needs output_dtype bfloat16 or int32; got {out}")
    if bias is not None:
        _need(bias.dtype in (torch.int32, torch.bfloat16, torch.float16, torch.float32), op,
              f"bias must be int32, bfloat16, float16 or float32; got {bias.dtype}")
        if bias.dim() == 1:
            _need(bias.shape[0] == n, op, f"a 1-d bias must be (n,)=({n},); got {tuple(bias.shape)}")
        else:
            _need(bias.dim() == 3 and len(batch) == 1, op,
                  f"bias must be (n,), or (batch, 1, n) for a 3-d output; got {tuple(bias.shape)} for a "
                  f"{len(batch) + 2}-d output")
            _need(tuple(bias.shape) == (batch[0], 1, n), op, f"a 3-d bias must be ({batch[0]}, 1, {n}); got "
                  f"{tuple(bias.shape)}")
    rows = [r for r in _INT8_ROWS if _row_fits(r, out, scale, offset, pertoken_scale, bias)]
    _need(bool(rows), op, "unsupported combination for int8 x int8 on Atlas A2: "
          f"output {out}, scale {scale.dtype}, offset {None if offset is None else offset.dtype}, "
          f"bias {None if bias is None else bias.dtype}, pertoken_scale "
          f"{None if pertoken_scale is None else pertoken_scale.dtype}")
    return (*batch, m, n), out


def _check_a8w4_matmul(op, x1, x2, scale, offset, pertoken_scale, bias, output_dtype):
    _need(x1.dim() == 2 and x2.dim() == 2, op, f"A8W4 takes x1 (m, k) and x2 (k, n/8); got {tuple(x1.shape)} and "
          f"{tuple(x2.shape)}")
    _need(x1.is_contiguous(), op, "A8W4 x1 must not be transposed")
    m, k = x1.shape
    n = x2.shape[1] * 8
    _need(x2.shape[0] == k, op, f"x1 (m, k={k}) and x2 (k, n/8) disagree on k: x2 is {tuple(x2.shape)}")
    _need(k <= MAX_DIM and n <= MAX_DIM, op, f"k={k} and n={n} must not exceed {MAX_DIM}")
    _need(scale.dtype == torch.int64, op, f"A8W4 scale must be int64 (npu_trans_quant_param words); got {scale.dtype}")
    _need(scale.dim() == 2 and tuple(scale.shape) == (k // A8W4_GROUP, n), op,
          f"A8W4 scale must be (k/{A8W4_GROUP}, n)=({k // A8W4_GROUP}, {n}); got {tuple(scale.shape)}")
    if offset is not None:
        _need(offset.dtype == torch.float32, op, f"A8W4 offset must be float32; got {offset.dtype}")
        _need(offset.dim() == 1 and offset.shape[0] in (1, n), op,
              f"A8W4 offset must be (1,) or (n,)=({n},); got {tuple(offset.shape)}")
    if pertoken_scale is not None:
        _need(pertoken_scale.dtype == torch.float32, op, f"A8W4 pertoken_scale must be float32; got "
              f"{pertoken_scale.dtype}")
        _need(tuple(pertoken_scale.shape) == (m, 1), op,
              f"A8W4 pertoken_scale must be 2-d (m, 1)=({m}, 1); got {tuple(pertoken_scale.shape)}")
    if bias is not None:
        _need(bias.dtype == torch.int32, op, f"A8W4 bias must be int32; got {bias.dtype}")
    _need(output_dtype is None or output_dtype in _FLOAT16S, op,
          f"A8W4 output_dtype must be torch.float16 or torch.bfloat16; got {output_dtype}")
    return (m, n), output_dtype


def npu_quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None,
                     x1_dtype=None, x2_dtype=None, pertoken_scale_dtype=None, scale_dtype=None, group_sizes=None,
                     y_scale=None):
    op = "npu_quant_matmul"
    for name, t, opt in (("x1", x1, False), ("x2", x2, False), ("scale", scale, False), ("offset", offset, True),
                         ("pertoken_scale", pertoken_scale, True), ("bias", bias, True), ("y_scale", y_scale, True)):
        _tensor(op, name, t, optional=opt)
    _need(output_dtype is None or isinstance(output_dtype, torch.dtype), op,
          f"output_dtype must be a torch dtype or None; got {output_dtype!r}")
    _need(group_sizes is None or (isinstance(group_sizes, (list, tuple)) and all(isinstance(g, int) for g in group_sizes)),
          op, f"group_sizes must be a list of ints or None; got {group_sizes!r}")
    _need(x1.dtype in (torch.int8, torch.int32) and x2.dtype in (torch.int8, torch.int32), op,
          f"x1 / x2 must be int8 or int32 on Atlas A2; got {x1.dtype} / {x2.dtype}")
    _need(not (x1.dtype == torch.int32 and x2.dtype == torch.int8), op, "x1 int32 needs x2 int32 (int4 x int4)")
    if any(a is not None for a in (x1_dtype, x2_dtype, pertoken_scale_dtype, scale_dtype, y_scale)):
        _unsupported(op, "x1_dtype / x2_dtype / pertoken_scale_dtype / scale_dtype / y_scale (fp4, hifloat8, mx)")
    if x1.dtype == torch.int32:
        _unsupported(op, "int4 x int4 (x1 and x2 int32)")
    if x2.dtype == torch.int32:
        shape, out = _check_a8w4_matmul(op, x1, x2, scale, offset, pertoken_scale, bias, output_dtype)
    else:
        shape, out = _check_int8_matmul(op, x1, x2, scale, offset, pertoken_scale, bias, output_dtype, group_sizes)
    _same_device(op, x1, x2, scale, offset, pertoken_scale, bias)
    kw = {} if group_sizes is None else {"group_sizes": list(group_sizes)}
    y = ops_matmul.npu_quant_matmul(x1, x2, scale, offset=offset, pertoken_scale=pertoken_scale, bias=bias,
                                    output_dtype=output_dtype, **kw)
    _post(op, y, out, shape)
    _record(op, dict(x1=x1, x2=x2, scale=scale, offset=offset, pertoken_scale=pertoken_scale, bias=bias,
                     output_dtype=output_dtype, group_sizes=group_sizes), y)
    return y


# -- npu_weight_quant_batchmatmul -----------------------------------------------------------------
def npu_weight_quant_batchmatmul(x, weight, antiquant_scale, antiquant_offset=None, quant_scale=None,
                                 quant_offset=None, bias=None, antiquant_group_size=0, inner_precise=0,
                                 weight_dtype=None):
    op = "npu_weight_quant_batchmatmul"
    for name, t, opt in (("x", x, False), ("weight", weight, False), ("antiquant_scale", antiquant_scale, False),
                         ("antiquant_offset", antiquant_offset, True), ("quant_scale", quant_scale, True),
                         ("quant_offset", quant_offset, True), ("bias", bias, True)):
        _tensor(op, name, t, optional=opt)
    _need(isinstance(antiquant_group_size, int) and isinstance(inner_precise, int), op,
          "antiquant_group_size and inner_precise must be ints")
    _need(x.dtype in _FLOAT16S, op, f"x must be float16 or bfloat16; got {x.dtype}")
    _need(x.dim() == 2 and weight.dim() == 2, op, f"x must be (M, K) and weight (K, N); got {tuple(x.shape)} and "
          f"{tuple(weight.shape)}")
    _need(x.numel() > 0 and weight.numel() > 0, op, "empty tensors are not supported")
    _need(weight.dtype in (torch.int8, torch.int32), op, f"weight must be int8 or int32 (int4 pack); got {weight.dtype}")
    if weight.dtype == torch.int32 and not weight.is_contiguous():
        _unsupported(op, "a transposed int32 weight")
    m, k = x.shape
    n = weight.shape[1] * 8 if weight.dtype == torch.int32 else weight.shape[1]
    _need(weight.shape[0] == k, op, f"x (M, K={k}) and weight (K, N) disagree on K: weight is {tuple(weight.shape)}")
    _need(1 <= k <= MAX_DIM and 1 <= n <= MAX_DIM, op, f"K={k} and N={n} must lie in [1, {MAX_DIM}]")
    s = antiquant_scale
    _need(s.dtype == x.dtype or s.dtype == torch.int64, op,
          f"antiquant_scale must have x's dtype {x.dtype} (or be int64); got {s.dtype}")
    if antiquant_group_size:
        g = antiquant_group_size
        _need(g % 32 == 0 and 32 <= g <= k - 1, op, f"antiquant_group_size={g} must be a multiple of 32 in [32, K-1={k - 1}]")
        _need(tuple(s.shape) == (math.ceil(k / g), n), op,
              f"per-group antiquant_scale must be (ceil(K/g), N)=({math.ceil(k / g)}, {n}); got {tuple(s.shape)}")
    else:
        _need(tuple(s.shape) in ((1,), (1, 1), (n,), (1, n)), op,
              f"antiquant_scale must be (1,) / (1, 1) per tensor or (N,) / (1, N)=({n},) per channel "
              f"(or set antiquant_group_size); got {tuple(s.shape)}")
    if antiquant_offset is not None:
        _need(antiquant_offset.shape == s.shape, op, f"antiquant_offset must have antiquant_scale's shape "
              f"{tuple(s.shape)}; got {tuple(antiquant_offset.shape)}")
        want = torch.int32 if s.dtype == torch.int64 else s.dtype
        _need(antiquant_offset.dtype == want, op, f"antiquant_offset must be {want}; got {antiquant_offset.dtype}")
    _need(quant_offset is None or quant_scale is not None, op, "quant_offset needs quant_scale")
    if quant_scale is not None:
        _need(quant_scale.dtype in (torch.float32, torch.int64), op, f"quant_scale must be float32 or int64; got "
              f"{quant_scale.dtype}")
        _need(tuple(quant_scale.shape) in ((1,), (n,), (1, n)), op, f"quant_scale must be (1,), (N,) or (1, N); got "
              f"{tuple(quant_scale.shape)}")
        _need(s.dtype != torch.int64, op, "quant_scale cannot be combined with an int64 antiquant_scale")
    if quant_offset is not None:
        _need(quant_offset.dtype == torch.float32 and quant_offset.shape == quant_scale.shape, op,
              "quant_offset must be float32 with quant_scale's shape")
    if bias is not None:
        want = torch.float16 if x.dtype == torch.float16 else torch.float32
        _need(bias.dtype == want, op, f"bias must be {want} for {x.dtype} x; got {bias.dtype}")
        _need(tuple(bias.shape) in ((1,), (n,), (1, n)), op, f"bias must be (1,), (N,) or (1, N)=({n},); got "
              f"{tuple(bias.shape)}")
        _need(bias.is_contiguous(), op, "bias must be contiguous")
    _need(inner_precise in (0, 1), op, f"inner_precise must be 0 or 1; got {inner_precise}")
    _same_device(op, x, weight, antiquant_scale, antiquant_offset, quant_scale, quant_offset, bias)
    if s.dtype == torch.int64:
        _unsupported(op, "an int64 antiquant_scale")
    if quant_scale is not None:
        _unsupported(op, "quant_scale / quant_offset (int8 output)")
    if weight_dtype is not None:
        _unsupported(op, f"weight_dtype={weight_dtype}")
    y = ops_matmul.npu_weight_quant_batchmatmul(x, weight, antiquant_scale, antiquant_offset, quant_scale, quant_offset,
                                                bias, antiquant_group_size, inner_precise)
    _post(op, y, x.dtype, (m, n))
    _record(op, dict(x=x, weight=weight, antiquant_scale=antiquant_scale, antiquant_offset=antiquant_offset,
                     quant_scale=quant_scale, quant_offset=quant_offset, bias=bias,
                     antiquant_group_size=antiquant_group_size, inner_precise=inner_precise), y)
    return y


# -- npu_trans_quant_param -----------------------------------------------------------------------
def npu_trans_quant_param(scale, offset=None, round_mode=0):
    op = "npu_trans_quant_param"
    _tensor(op, "scale", scale)
    _tensor(op, "offset", offset, optional=True)
    _need(scale.dtype == torch.float32, op, f"scale must be float32; got {scale.dtype}")
    _need(scale.dim() == 1 or (scale.dim() == 2 and scale.shape[0] == 1), op,
          f"scale must be (t,) or (1, n); got {tuple(scale.shape)}")
    _need(round_mode in (0, 1) and not isinstance(round_mode, bool), op, f"round_mode must be 0 or 1; got {round_mode!r}")
    shape = tuple(scale.shape)
    if offset is not None:
        _need(offset.dtype == torch.float32, op, f"offset must be float32; got {offset.dtype}")
        if scale.dim() == 2:
            _need(offset.shape == scale.shape, op, f"with a (1, n) scale offset must be {tuple(scale.shape)}; got "
                  f"{tuple(offset.shape)}")
        else:
            _need(offset.dim() == 1, op, f"with a 1-d scale offset must be 1-d; got {tuple(offset.shape)}")
            t, u = scale.shape[0], offset.shape[0]
            _need(t == u or t == 1 or u == 1, op, f"scale ({t},) and offset ({u},) sizes must match unless one is 1")
            shape = (max(t, u),)
    _same_device(op, scale, offset)
    y = ops_quant.npu_trans_quant_param(scale, offset, round_mode)
    _post(op, y, torch.int64, shape)
    _record(op, dict(scale=scale, offset=offset, round_mode=round_mode), y)
    return y


# -- npu_convert_weight_to_int4pack ---------------------------------------------------------------
def npu_convert_weight_to_int4pack(weight, inner_k_tiles=0):
    op = "npu_convert_weight_to_int4pack"
    _tensor(op, "weight", weight)
    _need(isinstance(inner_k_tiles, int), op, f"inner_k_tiles must be an int; got {inner_k_tiles!r}")
    _need(weight.dtype == torch.int32, op, f"weight must be int32; got {weight.dtype}")
    _need(weight.dim() == 2, op, f"weight must be 2-d; got {tuple(weight.shape)}")
    _need(weight.is_contiguous(), op, "weight must be contiguous")
    _need(weight.shape[-1] % 8 == 0, op, f"the last dim must be a multiple of 8; got {weight.shape[-1]}")
    if weight.numel():
        _need(int(weight.min()) >= -8 and int(weight.max()) <= 7, op, "weight values must lie in [-8, 7]")
    y = ops_quant.npu_convert_weight_to_int4pack(weight, inner_k_tiles)
    _post(op, y, torch.int32, (weight.shape[0], weight.shape[1] // 8))
    _record(op, dict(weight=weight, inner_k_tiles=inner_k_tiles), y)
    return y


OPS = ("npu_dynamic_quant", "npu_quantize", "npu_quant_matmul", "npu_weight_quant_batchmatmul",
       "npu_trans_quant_param", "npu_convert_weight_to_int4pack")
