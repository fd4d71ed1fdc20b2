"""Reference kernels of the quantized matmuls: ``npu_quant_matmul`` and ``npu_weight_quant_batchmatmul``.

Integer products are accumulated exactly, on a BLAS path that runs on any device (unlike integer
matmul): K is split into chunks of 1024, each multiplied in float32 (every partial sum of 1024
products of int8 values is an integer of magnitude <= 1024 * 128^2 = 2^24, so exact in float32
whatever the summation order), and the chunks are added in float64 (the int32 accumulator's
value). The epilogues then follow the NPU's order in fp32.
"""
from __future__ import annotations

import torch

from qnpu.qcore import unpack_int4

from .encodings import decode_deq_scale, encode_deq_scale
from .library import float_dtypes, register, require

MAX_DIM = 65535
A8W4_GROUP = 256
_OUT_MM = (torch.int8, torch.float16, torch.bfloat16, torch.float32)


EXACT_CHUNK = 1024


def _int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact matmul (batched, broadcast) of integer tensors whose products are <= 2^14 in magnitude, as float64."""
    a, b = a.to(torch.float32), b.to(torch.float32)
    k = a.shape[-1]
    out = None
    for start in range(0, k, EXACT_CHUNK):
        part = torch.matmul(a[..., start:start + EXACT_CHUNK], b[..., start:start + EXACT_CHUNK, :]).to(torch.float64)
        out = part if out is None else out + part
    return out


def _cast_out(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.int8:
        return torch.clamp(torch.round(y), -128, 127).to(torch.int8)
    return y.to(dtype)


# -- npu_quant_matmul --------------------------------------------------------------------------
def _check_a8w4(x1, x2, scale, offset, pertoken_scale, bias, output_dtype, group_sizes):
    op = "npu_quant_matmul"
    require(x1.dim() == 2 and x2.dim() == 2, op, "A8W4 (int8 x1, int32-packed int4 x2) takes 2-d x1 (m, k) and x2 (k, n/8)")
    m, k = x1.shape
    n = x2.shape[1] * 8
    require(x2.shape[0] == k, op, f"k dim of x1 ({k}) and x2 ({x2.shape[0]}) must match")
    require(k <= MAX_DIM and n <= MAX_DIM, op, f"k={k} and n={n} must be <= {MAX_DIM}")
    require(scale.dtype == torch.int64, op, f"scale must be int64 (npu_trans_quant_param) in A8W4; got {scale.dtype}")
    require(scale.dim() == 2 and scale.shape == (k // A8W4_GROUP, n), op,
            f"A8W4 scale must be 2-d (k // {A8W4_GROUP}, n) = ({k // A8W4_GROUP}, {n}); got {tuple(scale.shape)}")
    # The meta rule only checks k // 256 groups; what the kernel does with a tail is undocumented,
    # so the reference accepts whole groups only.
    require(k % A8W4_GROUP == 0, op, f"A8W4 needs k ({k}) to be a multiple of {A8W4_GROUP} (its group size)")
    require(group_sizes is None or list(group_sizes) == [0, 0, A8W4_GROUP], op,
            f"A8W4 group_sizes must be None or [0, 0, {A8W4_GROUP}]; got {group_sizes}")
    if offset is not None:
        require(offset.dtype == torch.float32 and offset.shape == (n,), op,
                f"A8W4 offset (yOffset) must be float32 (n,)=({n},); got {offset.dtype} {tuple(offset.shape)}")
    if pertoken_scale is not None:
        require(pertoken_scale.dtype == torch.float32 and pertoken_scale.shape == (m, 1), op,
                f"A8W4 pertoken_scale must be float32 (m, 1)=({m}, 1); got {pertoken_scale.dtype} "
                f"{tuple(pertoken_scale.shape)}")
    require(bias is None, op, "an A8W4 bias is not implemented by the reference (its place in the epilogue is undocumented)")
    require(output_dtype in (torch.float16, torch.bfloat16, torch.float32), op,
            f"A8W4 output_dtype must be torch.float16 or torch.bfloat16 (float32: reference only); got {output_dtype}")
    return (m, n), output_dtype


def _check_quant_matmul(x1, x2, scale, offset, pertoken_scale, bias, output_dtype, group_sizes):
    op = "npu_quant_matmul"
    if x1.dtype == torch.int8 and x2.dtype == torch.int32:
        return _check_a8w4(x1, x2, scale, offset, pertoken_scale, bias, output_dtype, group_sizes)
    require(x1.dtype == torch.int8 and x2.dtype == torch.int8, op,
            f"x1/x2 must be int8/int8 or int8/int32 (A8W4); got {x1.dtype}/{x2.dtype} (int32/int32 A4W4 is not "
            "implemented by the reference)")
    require(2 <= x1.dim() <= 6 and 2 <= x2.dim() <= 6, op, f"x1 and x2 must have 2-6 dims; got {x1.dim()} and {x2.dim()}")
    k, n = x1.shape[-1], x2.shape[-1]
    require(x2.shape[-2] == k, op, f"k dim of x1 ({k}) and x2 ({x2.shape[-2]}) need be same")
    require(k <= MAX_DIM and n <= MAX_DIM, op, f"the last dims of x1 ({k}) and x2 ({n}) must be <= {MAX_DIM}")
    try:
        batch = torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2])
    except RuntimeError:
        batch = None
    require(batch is not None, op, f"the batch shapes {tuple(x1.shape[:-2])} and {tuple(x2.shape[:-2])} cannot be broadcast")
    out = torch.int8 if output_dtype is None else output_dtype
    require(out in _OUT_MM, op, f"output_dtype={output_dtype} is not implemented by the reference; allowed: "
            "torch.int8, torch.float16, torch.bfloat16 (torch.float32: reference only)")
    require(group_sizes is None or all(g == 0 for g in group_sizes), op,
            f"group_sizes={group_sizes}: block-wise int8 scales are not implemented by the reference")
    require(scale.dtype in (torch.float32, torch.int64, torch.bfloat16), op,
            f"scale must be float32, int64 or bfloat16; got {scale.dtype}")
    require(scale.dim() == 1 and scale.shape[0] in (1, n), op, f"scale must be 1-d (1,) or (n,)=({n},); got {tuple(scale.shape)}")
    require(scale.dtype != torch.bfloat16 or out == torch.bfloat16, op,
            f"a bfloat16 scale needs output_dtype=torch.bfloat16; got {out}")
    require(scale.dtype != torch.int64 or pertoken_scale is None, op, "an int64 scale cannot be combined with pertoken_scale")
    require(scale.dtype != torch.int64 or out in (torch.int8, torch.float16, torch.float32), op,
            f"an int64 (deq-scale) scale needs output_dtype int8 or float16 on A2; got {out}")
    if offset is not None:
        require(offset.dtype == torch.float32 and offset.dim() == 1 and offset.shape[0] in (1, n), op,
                f"offset must be float32 of shape (1,) or (n,); got {offset.dtype} {tuple(offset.shape)}")
        require(out == torch.int8, op, f"offset applies to int8 output only; output_dtype is {out}")
    if pertoken_scale is not None:
        require(pertoken_scale.dtype == torch.float32 and pertoken_scale.dim() == 1
                and pertoken_scale.shape[0] == x1.shape[-2], op,
                f"pertoken_scale must be float32 of shape (m,)=({x1.shape[-2]},); got {pertoken_scale.dtype} "
                f"{tuple(pertoken_scale.shape)}")
        require(out != torch.int8, op, "pertoken_scale needs a float output_dtype")
    if bias is not None:
        require(bias.dtype in (torch.int32, torch.bfloat16, torch.float16, torch.float32), op,
                f"bias must be int32, bfloat16, float16 or float32; got {bias.dtype}")
        require(bias.dtype != torch.bfloat16 or out == torch.bfloat16, op, "a bfloat16 bias needs output_dtype=torch.bfloat16")
        require(bias.dtype != torch.float16 or (pertoken_scale is not None and out == torch.float16), op,
                "a float16 bias needs pertoken_scale and output_dtype=torch.float16")
        require(bias.dtype == torch.int32 or pertoken_scale is not None or out in (torch.bfloat16, torch.float32), op,
                f"without pertoken_scale a float bias needs output_dtype=torch.bfloat16 (int8 / float16 outputs take an "
                f"int32 bias); got {bias.dtype} bias with {out} output")
        require(bias.dim() == 1 and bias.shape[0] == n or bias.dim() == 3 and bias.shape[1:] == (1, n), op,
                f"bias must be (n,)=({n},) or (batch, 1, n); got {tuple(bias.shape)}")
        if bias.dim() == 3:
            require(len(batch) == 1, op, f"a 3-d bias needs a 3-d output; the output has {len(batch) + 2} dims")
            require(bias.shape[0] == batch[0], op, f"a 3-d bias's batch dim ({bias.shape[0]}) must equal the "
                    f"broadcast batch of x1 and x2 ({batch[0]})")
    return (*batch, x1.shape[-2], n), out


def _a8w4(x1, x2, scale, offset, pertoken_scale, out):
    w = unpack_int4(x2, dim=-1)                          # (k, n) int4 values
    s2 = decode_deq_scale(scale)[0]                      # (k / 256, n) fp32
    x = x1.to(torch.int16) - 8                           # the MSD split leaves out the "+8" term (|x| <= 136)
    y = torch.zeros(x1.shape[0], w.shape[1], dtype=torch.float32, device=x1.device)
    for g in range(s2.shape[0]):
        ks = slice(g * A8W4_GROUP, (g + 1) * A8W4_GROUP)
        y = y + _int_matmul(x[:, ks], w[ks]).to(torch.float32) * s2[g]
    if offset is not None:
        y = y + offset
    if pertoken_scale is not None:
        y = y * pertoken_scale
    return _cast_out(y, out)


def npu_quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None, group_sizes=None):
    """torch_npu.npu_quant_matmul: int8 x int8 (or A8W4) matmul with the NPU's dequant epilogue.

    x1 ``(..., m, k)`` int8, x2 ``(..., k, n)`` int8 (not transposed); output ``(..., m, n)``.
    Epilogue order (ops-nn ``quant_batch_matmul_v3``, CATLASS per-token dequant epilogue):
    ``acc = x1 @ x2`` exact in int32 ``(+ int32 bias)`` -> fp32 (rint) -> ``* scale[n]`` ->
    ``* pertoken_scale[m]`` -> ``+ float bias`` -> ``(+ offset)`` -> rint / saturating cast.
    Scale encodings: an int64 scale is a deq-scale word (`encodings.decode_deq_scale`, top 19 bits
    of the fp32); a float32 scale with int8/float16 output and no ``pertoken_scale`` is converted
    by op-plugin through ``npu_trans_quant_param`` (so truncated to fp19 as well, and ``offset``
    rounded into the word); with bfloat16 output or a ``pertoken_scale`` it stays full fp32.

    A8W4 (x1 int8 ``(m, k)``, x2 int32 ``(k, n/8)`` from ``npu_convert_weight_to_int4pack``, int64
    scale ``(k/256, n)``, ``pertoken_scale (m, 1)``, ``offset`` = yOffset ``(n,)``): A2 has no int8 x
    int4 cube mode, so CANN splits ``x1 = 16*hi + lo + 8`` and multiplies the int4 halves; the
    result is ``y = ((x1 - 8) @ (W * s2) + offset) * pertoken`` with per-256-group fp32 partial sums,
    so ``offset = 8 * sum_k(W * s2)`` restores ``x1 @ (W * s2)`` (CATLASS
    ``36_w4a8_matmul_msd``) **[derived: the hardware group accumulation may round in fp16]**.
    """
    shape, out = _check_quant_matmul(x1, x2, scale, offset, pertoken_scale, bias, output_dtype, group_sizes)
    if x2.dtype == torch.int32:
        return _a8w4(x1, x2, scale, offset, pertoken_scale, out)
    acc = _int_matmul(x1, x2)
    if bias is not None and bias.dtype == torch.int32:
        acc = acc + bias.to(torch.float64)
    accf = acc.to(torch.float32)
    if scale.dtype == torch.float32 and pertoken_scale is None and out in (torch.int8, torch.float16):
        scale = encode_deq_scale(scale, offset)            # op-plugin's npu_trans_quant_param
        offset = None
    word_offset = None
    if scale.dtype == torch.int64:
        scale, word_offset = decode_deq_scale(scale)
    y = accf * scale.to(torch.float32)
    if pertoken_scale is not None:
        y = y * pertoken_scale.unsqueeze(-1)
    if bias is not None and bias.dtype != torch.int32:
        y = y + bias.to(torch.float32)
    if out == torch.int8:
        y = y + (offset if offset is not None else word_offset)
    return _cast_out(y, out)


def _fake_quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None, group_sizes=None):
    shape, out = _check_quant_matmul(x1, x2, scale, offset, pertoken_scale, bias, output_dtype, group_sizes)
    return x1.new_empty(shape, dtype=out)


# -- npu_weight_quant_batchmatmul ---------------------------------------------------------------
def _check_wqbmm(x, weight, scale, offset, quant_scale, quant_offset, bias, group_size):
    op = "npu_weight_quant_batchmatmul"
    float_dtypes(op, x.dtype, "x")
    require(x.dim() == 2 and weight.dim() == 2, op, f"x and weight must be 2-d (M, K) and (K, N); got {tuple(x.shape)} "
            f"and {tuple(weight.shape)}")
    require(weight.dtype in (torch.int8, torch.int32), op, f"weight must be int8 or int32 (packed int4); got {weight.dtype}")
    k = x.shape[1]
    n = weight.shape[1] * 8 if weight.dtype == torch.int32 else weight.shape[1]
    require(weight.shape[0] == k, op, f"k dim of x ({k}) and weight ({weight.shape[0]}) must match")
    require(1 <= k <= MAX_DIM and 1 <= n <= MAX_DIM, op, f"K={k} and N={n} must lie in [1, {MAX_DIM}]")
    require(quant_scale is None and quant_offset is None, op,
            "quant_scale / quant_offset (int8 output) are not implemented by the reference")
    require(scale.dtype == x.dtype, op, f"antiquant_scale must have x's dtype {x.dtype} (the int64 form is not "
            f"implemented by the reference); got {scale.dtype}")
    if group_size:
        require(group_size % 32 == 0 and 32 <= group_size <= k - 1, op,
                f"antiquant_group_size={group_size} must be a multiple of 32 in [32, K-1=({k - 1})]")
        groups = -(-k // group_size)
        require(scale.shape == (groups, n), op, f"per-group antiquant_scale must be (ceil(K/g), N)=({groups}, {n}); "
                f"got {tuple(scale.shape)}")
    else:
        require(tuple(scale.shape) in ((n,), (1, n), (1,), (1, 1)), op,
                f"antiquant_scale must be (N,), (1, N) per-channel or (1,) per-tensor (N={n}), or pass "
                f"antiquant_group_size for (ceil(K/g), N); got {tuple(scale.shape)}")
    if offset is not None:
        require(offset.shape == scale.shape and offset.dtype == scale.dtype, op,
                f"antiquant_offset must match antiquant_scale's shape and dtype; got {tuple(offset.shape)} "
                f"{offset.dtype} vs {tuple(scale.shape)} {scale.dtype}")
    if bias is not None:
        want = torch.float32 if x.dtype != torch.float16 else torch.float16
        require(bias.dtype == want, op, f"bias must be {want} for {x.dtype} x; got {bias.dtype}")
        require(tuple(bias.shape) in ((n,), (1, n)), op, f"bias must be (N,) or (1, N); got {tuple(bias.shape)}")
    return n


def _rows(t, k, group_size):
    """Expand a per-channel / per-group parameter to one row per K index: (K, N)."""
    t = t.reshape(-1, t.shape[-1])
    if group_size:
        return t.repeat_interleave(group_size, dim=0)[:k]
    return t.expand(k, -1) if t.shape[0] == 1 else t


def npu_weight_quant_batchmatmul(x, weight, antiquant_scale, antiquant_offset=None, quant_scale=None,
                                 quant_offset=None, bias=None, antiquant_group_size=0, inner_precise=0):
    """torch_npu.npu_weight_quant_batchmatmul: weight-only W8A16 / W4A16.

    ``y = x @ ((weight + antiquant_offset) * antiquant_scale) + bias`` (torch_npu 2.13.0 docs;
    note the ``+offset`` sign, so an asymmetric zero point ``zp`` is passed as ``-zp``). x ``(M, K)``;
    weight int8 ``(K, N)`` or int32 ``(K, N/8)`` packed int4; scale/offset ``(N,)`` per-channel or
    ``(ceil(K/g), N)`` per-group, in x's dtype. The antiquant runs in x's dtype (each add and
    multiply rounded to it), the matmul accumulates in fp32 and adds the bias before the final
    cast **[derived: intermediate precisions]**.
    """
    n = _check_wqbmm(x, weight, antiquant_scale, antiquant_offset, quant_scale, quant_offset, bias, antiquant_group_size)
    k = x.shape[1]
    w = unpack_int4(weight, dim=-1) if weight.dtype == torch.int32 else weight
    w = w.to(x.dtype)
    if antiquant_offset is not None:
        w = w + _rows(antiquant_offset, k, antiquant_group_size)
    w = w * _rows(antiquant_scale, k, antiquant_group_size)
    y = torch.matmul(x.to(torch.float32), w.to(torch.float32))
    if bias is not None:
        y = y + bias.to(torch.float32).reshape(n)
    return y.to(x.dtype)


def _fake_wqbmm(x, weight, antiquant_scale, antiquant_offset=None, quant_scale=None, quant_offset=None, bias=None,
                antiquant_group_size=0, inner_precise=0):
    n = _check_wqbmm(x, weight, antiquant_scale, antiquant_offset, quant_scale, quant_offset, bias, antiquant_group_size)
    return x.new_empty((x.shape[0], n))


register("npu_quant_matmul", npu_quant_matmul, _fake_quant_matmul)
register("npu_weight_quant_batchmatmul", npu_weight_quant_batchmatmul, _fake_wqbmm)
