"""torch.ops.qnpu reference kernels against independent numpy oracles of the documented formulas.

Each fp32 step of an epilogue is an exact float64 operation followed by one rounding to fp32 (`_f32`), so
outputs are compared bit-exactly unless the accumulation order is unspecified (tolerance stated there).
"""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_map

from qnpu.lowering import OpArgumentError, decode_deq_scale, encode_deq_scale, fp19
from qnpu.qcore import unpack_int4

Q = torch.ops.qnpu
I8, I32, I64, F16, BF16, F32 = torch.int8, torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32
SIGNED = 1 << 46


# -- independent oracle helpers (numpy only) ----------------------------------------------------
def _f32(a):
    return np.asarray(a, np.float64).astype(np.float32).astype(np.float64)


def _np(t):
    return t.detach().to(torch.float64 if t.is_floating_point() else torch.int64).numpy()


def _fp19_np(s):
    bits = np.asarray(s, np.float64).astype(np.float32).view(np.uint32) & np.uint32(0xFFFFE000)
    return bits.view(np.float32).astype(np.float64)


def _decode_np(word):
    w = np.asarray(word, np.int64)
    scale = (w & 0xFFFFE000).astype(np.uint32).view(np.float32).astype(np.float64)
    off = (w >> 37) & 0x1FF
    return scale, np.where(off >= 256, off - 512, off).astype(np.float64)


def _cast(y, dtype):
    """The documented final cast of an fp32 value: rint + saturation for int8, RNE for floats."""
    if dtype == I8:
        return torch.from_numpy(np.clip(np.rint(y), -128, 127).astype(np.int8))
    return torch.from_numpy(y.astype(np.float32)).to(dtype)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randint(lo, hi, shape, g, dtype=I8):
    return torch.randint(lo, hi + 1, shape, generator=g, dtype=dtype)


def _messy_scales(n, g, lo=2e-3, hi=2e-2):
    """fp32 scales whose 13 low mantissa bits are all set: fp19 truncation moves them by ~2^-10."""
    s = torch.empty(n).uniform_(lo, hi, generator=g)
    return (s.view(I32) | 0x1FFF).view(F32)


# -- npu_dynamic_quant ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("smooth", [False, True], ids=["plain", "smooth"])
def test_dynamic_quant_matches_oracle(dtype, smooth):
    g = _gen(1)
    x = (torch.randn(2, 7, 64, generator=g) * 3).to(dtype)
    x[0, 3] = 0                                                  # all-zero row: scale 0, codes 0
    sm = torch.empty(64).uniform_(0.5, 2, generator=g).to(dtype) if smooth else None
    q, scale = Q.npu_dynamic_quant(x, smooth_scales=sm)
    xf = _f32(_np(x) * (1.0 if sm is None else _np(sm)))                  # kernel order, all in fp32
    amax = np.abs(xf).max(axis=-1)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, _f32(127.0 / amax), 0.0)
    assert q.dtype == I8 and scale.dtype == F32 and scale.shape == x.shape[:-1]
    assert np.array_equal(q.numpy(), np.clip(np.rint(_f32(xf * inv[..., None])), -128, 127))
    assert np.array_equal(_np(scale), _f32(amax * _f32(1.0 / 127.0)))


def test_dynamic_quant_multiplies_by_127_over_amax():
    # Row [11, 5.5]: 5.5 * 127/11 = 63.5 exactly in reals. fp32(127/11) rounds up, so 5.5 * fp32(127/11)
    # = 63.500004 -> 64, while 5.5 / fp32(11/127) and 5.5 * fp32(1/scale) = 63.499996 -> 63.
    x = torch.tensor([[11.0, 5.5]], dtype=F16)
    amax, v = np.float32(11.0), np.float32(5.5)
    scale = amax * np.float32(1 / 127)
    assert np.rint(v * (np.float32(127) / amax)) == 64 and np.rint(v / (amax / np.float32(127))) == 63
    assert np.rint(v / scale) == 63 and np.rint(v * (np.float32(1) / scale)) == 63
    q, s = Q.npu_dynamic_quant(x)
    assert q.tolist() == [[127, 64]] and s.item() == scale


# -- npu_quantize -----------------------------------------------------------------------------
def test_quantize_matches_oracle():
    g = _gen(2)
    x = (torch.randn(3, 4, 16, generator=g) * 40).to(BF16)
    # div_mode=True, per-channel on axis 1, int8 zero points: y = x / s + zp.
    s = torch.empty(4).uniform_(0.1, 1, generator=g)
    zp = _randint(-5, 5, (4,), g)
    y = Q.npu_quantize(x, s, zp, torch.qint8, 1, True)
    ref = _f32(_f32(_np(x) / _np(s)[:, None]) + _np(zp)[:, None])
    assert y.dtype == I8 and torch.equal(y, _cast(ref, I8))
    # div_mode=True to quint8 saturates to [0, 255].
    y = Q.npu_quantize(x, s, None, torch.quint8, 1)
    assert y.dtype == torch.uint8
    assert np.array_equal(y.numpy(), np.clip(np.rint(_f32(_np(x) / _np(s)[:, None])), 0, 255))
    # vllm-ascend W8A8 static call: (x, 1/scale in x.dtype, offset in x.dtype, qint8, -1, False): x * s + zp.
    s2 = torch.empty(16).uniform_(0.5, 4, generator=g).to(BF16)
    zp2 = torch.randint(-3, 4, (16,), generator=g).to(BF16)
    y = Q.npu_quantize(x, s2, zp2, torch.qint8, -1, False)
    assert torch.equal(y, _cast(_f32(_f32(_np(x) * _np(s2)) + _np(zp2)), I8))


# -- npu_trans_quant_param and the deq-scale encoding -------------------------------------------
def _bits(v):
    return torch.tensor([v], dtype=I64).to(I32).view(F32)        # fp32 with the given bit pattern


def test_trans_quant_param_hand_vectors():
    tq = Q.npu_trans_quant_param
    assert tq(torch.tensor([1.0])).tolist() == [0x3F800000 | SIGNED]      # = 0x40003F800000
    assert tq(torch.tensor([-0.5])).tolist() == [0xBF000000 | SIGNED]
    # 1 + 8191 * 2^-23: low 13 bits all set. round_mode 0 drops them; round_mode 1 rounds up to 1 + 2^-10.
    assert tq(_bits(0x3F801FFF)).tolist() == [0x3F800000 | SIGNED]
    assert tq(_bits(0x3F801FFF), None, 1).tolist() == [0x3F802000 | SIGNED]
    # exact halves round to even: 0x...1000 (bit 13 clear) stays, 0x...3000 (bit 13 set) goes up.
    assert tq(_bits(0x3F801000), None, 1).tolist() == [0x3F800000 | SIGNED]
    assert tq(_bits(0x3F803000), None, 1).tolist() == [0x3F804000 | SIGNED]
    # offsets: 9-bit two's complement in bits 45..37 after rint (half-to-even) and clamp to [-256, 255].
    off = torch.tensor([-3.0, 2.5, 3.5, 300.0, -1000.0, 0.0])
    got = tq(torch.tensor([1.0]), off)
    want = [0x3F800000 | SIGNED | (c << 37) for c in (0x1FD, 2, 4, 0xFF, 0x100, 0)]
    assert got.shape == (6,) and got.tolist() == want
    assert tq(torch.ones(1, 5), torch.full((1, 5), -3.0)).shape == (1, 5)


@given(st.floats(width=32, allow_nan=False))
def test_fp19_encode_decode_round_trip(v):
    s = torch.tensor([v], dtype=F32)
    t = fp19(s)
    want = _fp19_np([v])
    assert np.array_equal(t.view(I32).numpy(), want.astype(np.float32).view(np.int32))
    assert torch.equal(fp19(t).view(I32), t.view(I32))                    # idempotent
    for word in (encode_deq_scale(s), Q.npu_trans_quant_param(s)):
        assert int(word) >> 32 == SIGNED >> 32                          # only bit 46 above the fp32
        dec, off = decode_deq_scale(word)
        assert torch.equal(dec.view(I32), t.view(I32)) and off.item() == 0
    raw = s.view(I32).to(I64) & 0xFFFFFFFF                               # msModelSlim's zero-extended bits
    assert torch.equal(decode_deq_scale(raw)[0].view(I32), t.view(I32))


@given(st.integers(-256, 255))
def test_deq_offset_round_trip(o):
    word = Q.npu_trans_quant_param(torch.tensor([0.25]), torch.tensor([float(o)]))
    assert (int(word) >> 37) & 0x1FF == o & 0x1FF
    scale, off = decode_deq_scale(word)
    assert off.item() == o and scale.item() == 0.25
    assert _decode_np(word.numpy())[1][0] == o


# -- npu_convert_weight_to_int4pack -----------------------------------------------------------
def test_int4pack_hand_vector():
    # Nibbles LSB first: 1->0x1, -1->0xF, 2->0x2, -2->0xE, 3->0x3, -3->0xD, 7->0x7, -8->0x8.
    # Word 0x87D3E2F1 = 2278810353 unsigned = -2016156943 as int32.
    w = torch.tensor([[1, -1, 2, -2, 3, -3, 7, -8], [0] * 8, [-1] * 8, [7, 0, 0, 0, 0, 0, 0, 0]], dtype=I32)
    assert Q.npu_convert_weight_to_int4pack(w).tolist() == [[-2016156943], [0], [-1], [7]]


@given(st.integers(1, 4), st.integers(1, 3), st.integers(0, 2**32 - 1))
def test_int4pack_round_trip(rows, words, seed):
    w = _randint(-8, 7, (rows, 8 * words), _gen(seed), I32)
    packed = Q.npu_convert_weight_to_int4pack(w)
    nib = (_np(w) & 0xF).reshape(rows, words, 8)
    want = (nib << (4 * np.arange(8))).sum(-1).astype(np.uint32).view(np.int32)
    assert packed.dtype == I32 and np.array_equal(packed.numpy(), want)
    back = (packed.numpy().astype(np.int64)[..., None] >> (4 * np.arange(8))) & 0xF
    assert np.array_equal(np.where(back >= 8, back - 16, back).reshape(rows, -1), _np(w))
    assert torch.equal(unpack_int4(packed, dim=-1).to(I32), w)


# -- npu_quant_matmul, int8 x int8 -------------------------------------------------------------
def _qmm_ref(x1, x2, scale, offset=None, pertoken=None, bias=None, out=I8):
    """Documented epilogue: int acc (+int32 bias) -> fp32 -> *scale -> *pertoken -> +float bias -> +offset."""
    acc = np.matmul(_np(x1), _np(x2)).astype(np.float64)
    if bias is not None and bias.dtype == I32:
        acc = acc + _np(bias)
    y = _f32(acc)
    off = None if offset is None else _np(offset)
    if scale.dtype == I64:
        s, off = _decode_np(_np(scale))
    else:
        s = _np(scale)
        if scale.dtype == F32 and pertoken is None and out in (I8, F16):   # op-plugin's npu_trans_quant_param
            s = _fp19_np(s)
            off = None if off is None else np.clip(np.rint(off), -256, 255)
    y = _f32(y * s)
    if pertoken is not None:
        y = _f32(y * _np(pertoken)[:, None])
    if bias is not None and bias.dtype != I32:
        y = _f32(y + _np(bias))
    if out == I8 and off is not None:
        y = _f32(y + off)
    return _cast(y, out)


def _qmm_cases():
    g = _gen(3)
    m, k, n = 6, 40, 12
    x1, x2, s = _randint(-128, 127, (m, k), g), _randint(-128, 127, (k, n), g), _messy_scales(n, g)
    pt = torch.empty(m).uniform_(0.5, 2, generator=g)
    fbias = torch.randn(n, generator=g) * 8
    return {
        "f32-scale-fp16-truncated": ((x1, x2, s), dict(output_dtype=F16)),
        "f32-scale-bf16-full": ((x1, x2, s), dict(output_dtype=BF16)),
        "int64-scale-int32-bias": ((x1, x2, Q.npu_trans_quant_param(s)),
                                   dict(bias=_randint(-5000, 5000, (n,), g, I32), output_dtype=F16)),
        "raw-fp32-bits-int64": ((x1, x2, s.view(I32).to(I64) & 0xFFFFFFFF), dict(output_dtype=F16)),
        "pertoken-fp16-bias": ((x1, x2, s), dict(pertoken_scale=pt, bias=fbias.to(F16), output_dtype=F16)),
        "pertoken-bf16-batched": ((_randint(-128, 127, (2, m, k), g), x2, s),
                                  dict(pertoken_scale=pt, bias=fbias, output_dtype=BF16)),
        "bf16-scale-3d-bias": ((_randint(-128, 127, (2, m, k), g), _randint(-128, 127, (2, k, n), g), s.to(BF16)),
                               dict(bias=fbias.to(BF16).reshape(1, 1, n).expand(2, 1, n).contiguous(),
                                    output_dtype=BF16)),
        "int8-out-f32-offset": ((x1, x2, torch.tensor([0.0021])),
                                dict(offset=torch.tensor([-3.0, 2.5, 3.5, 0.4, -7.6, 300.0] * 2))),
        "int8-out-int64-offset": ((x1, x2, Q.npu_trans_quant_param(s, torch.arange(n) * 1.5 - 9)), {}),
    }


@pytest.mark.parametrize("name", list(_qmm_cases()))
def test_quant_matmul_matches_oracle(name):
    args, kw = _qmm_cases()[name]
    y = Q.npu_quant_matmul(*args, **kw)
    ref = _qmm_ref(*args, offset=kw.get("offset"), pertoken=kw.get("pertoken_scale"), bias=kw.get("bias"),
                   out=kw.get("output_dtype") or I8)
    assert y.dtype == ref.dtype and y.shape == ref.shape
    assert torch.equal(y, ref)


def test_quant_matmul_scale_truncation_hand_vectors():
    one = torch.ones(1, 1, dtype=I8)
    # 1 + 2^-11 + 2^-23: fp19 keeps 1.0; unrounded it would round to 1 + 2^-10 in fp16.
    assert Q.npu_quant_matmul(one, one, _bits(0x3F801001), output_dtype=F16).item() == 1.0
    # 1 + 2^-8 + 2^-23 stays full fp32 with bf16 output -> 1 + 2^-7; fp19 (1 + 2^-8, a tie) would give 1.0.
    assert Q.npu_quant_matmul(one, one, _bits(0x3F808001), output_dtype=BF16).item() == 1.0078125
    # the per-token path also keeps the full fp32 scale even with fp16 output.
    y = Q.npu_quant_matmul(one, one, _bits(0x3F801001), pertoken_scale=torch.ones(1), output_dtype=F16)
    assert y.item() == 1.0009765625


# -- npu_quant_matmul, A8W4 ------------------------------------------------------------------------
@pytest.mark.parametrize("out", [F16, BF16], ids=["fp16", "bf16"])
def test_quant_matmul_a8w4_with_y_offset(out):
    g = _gen(4)
    m, k, n = 5, 512, 16
    x1, w = _randint(-128, 127, (m, k), g), _randint(-8, 7, (k, n), g, I32)
    s = _messy_scales(k // 256 * n, g)
    scale = Q.npu_trans_quant_param(s).reshape(k // 256, n)
    s19 = np.repeat(_fp19_np(_np(s)).reshape(k // 256, n), 256, axis=0)       # (k, n) per-group fp19 scales
    ws = _np(w) * s19
    y_off = torch.from_numpy(8 * ws.sum(0)).to(F32)                           # yOffset = 8 * sum_k(W * s)
    pt = torch.empty(m, 1).uniform_(0.05, 1, generator=g)
    x2 = Q.npu_convert_weight_to_int4pack(w)
    y = Q.npu_quant_matmul(x1, x2, scale, offset=y_off, pertoken_scale=pt, output_dtype=out)
    # fp32 epilogue (per-group partial sums, + yOffset) ~ 2^-20 of the magnitudes, then a half-ulp cast.
    mag = (np.abs(_np(x1) - 8) @ np.abs(ws) + np.abs(_np(y_off))) * _np(pt)
    tol = lambda ref: {F16: 2.0**-11, BF16: 2.0**-8}[out] * np.abs(ref) + 2.0**-20 * mag + 2.0**-24  # noqa: E731
    ref = (_np(x1) @ ws) * _np(pt)                                             # x1 @ (W * s) * pertoken
    assert y.dtype == out and y.shape == (m, n) and np.all(np.abs(_np(y) - ref) <= tol(ref))
    # without yOffset the kernel computes (x1 - 8) @ (W * s) * pertoken (the MSD split's missing term).
    y0 = Q.npu_quant_matmul(x1, x2, scale, pertoken_scale=pt, output_dtype=out)
    ref0 = ((_np(x1) - 8) @ ws) * _np(pt)
    assert np.all(np.abs(_np(y0) - ref0) <= tol(ref0))


# -- npu_weight_quant_batchmatmul -------------------------------------------------------------------
WQ_CASES = {  # name: (x dtype, int4?, K, N, group size, scale shape, offset?, bias dtype/shape)
    "int8-per-channel-sym": (BF16, False, 64, 24, 0, "n", False, None),
    "int8-per-channel-asym-fp16": (F16, False, 64, 24, 0, "1n", True, (F16, (24,))),
    "int8-per-tensor-asym": (F16, False, 40, 16, 0, "1", True, None),
    "int4-per-group-32": (BF16, True, 96, 16, 32, "g", True, (F32, (1, 16))),
    "int4-per-group-tail": (F16, True, 80, 24, 64, "g", True, None),
}


@pytest.mark.parametrize("name", list(WQ_CASES))
def test_weight_quant_batchmatmul_matches_oracle(name):
    dt, int4, k, n, gs, sshape, has_off, bias_spec = WQ_CASES[name]
    g = _gen(5)
    x = torch.randn(7, k, generator=g).to(dt)
    w = _randint(-8, 7, (k, n), g, I32) if int4 else _randint(-128, 127, (k, n), g)
    rows = -(-k // gs) if gs else 1
    shape = {"n": (n,), "1n": (1, n), "1": (1,), "g": (rows, n)}[sshape]
    scale = torch.empty(shape).uniform_(0.002, 0.02, generator=g).to(dt)
    off = torch.randint(-6, 7, shape, generator=g).to(dt) if has_off else None   # = -zero_point
    bias = None if bias_spec is None else torch.randn(bias_spec[1], generator=g).to(bias_spec[0])
    weight = Q.npu_convert_weight_to_int4pack(w) if int4 else w
    y = Q.npu_weight_quant_batchmatmul(x, weight, scale, off, None, None, bias, gs)

    def per_k(t):  # (.., N) per-channel / per-group parameter -> one row per K index
        a = _np(t).reshape(-1, _np(t).shape[-1])
        return np.repeat(a, gs, axis=0)[:k] if gs else a
    w_deq = (_np(w) + (0 if off is None else per_k(off))) * per_k(scale)       # (W + offset) * scale
    b = 0 if bias is None else _np(bias).reshape(n)
    ref = _np(x) @ w_deq + b
    # antiquant in x's dtype + fp32 accumulation + output cast: within one ulp of x's dtype of the magnitudes.
    mag = np.abs(_np(x)) @ np.abs(w_deq) + np.abs(b)
    assert y.dtype == dt and y.shape == (7, n)
    assert np.all(np.abs(_np(y) - ref) <= {F16: 2.0**-10, BF16: 2.0**-7}[dt] * mag)


def test_weight_quant_batchmatmul_offset_sign_hand_vector():
    # (3 + (-1)) * 2 = 4: the offset is added (an asymmetric zero point 1 is passed as -1).
    x, w = torch.ones(1, 1, dtype=F16), torch.full((1, 1), 3, dtype=I8)
    y = Q.npu_weight_quant_batchmatmul(x, w, torch.tensor([2.0], dtype=F16), torch.tensor([-1.0], dtype=F16))
    assert y.item() == 4.0


# -- argument checks -------------------------------------------------------------------------------
def _z(dtype, *shape):
    return torch.zeros(shape, dtype=dtype)


def _dq(x=(F16, 2, 4), **kw):
    return Q.npu_dynamic_quant(_z(*x), **kw)


def _qz(x=(F16, 2, 4), s=(F32, 4), zp=None, dtype=torch.qint8, div=True):
    return Q.npu_quantize(_z(*x), _z(*s), None if zp is None else _z(*zp), dtype, -1, div)


def _qmm(x1=(2, 4), x2=(4, 3), scale=(F32, 3), **kw):
    return Q.npu_quant_matmul(_z(I8, *x1), _z(I8, *x2), _z(*scale), **kw)


def _a8w4(k=256, scale=(I64, 1, 8), **kw):
    return Q.npu_quant_matmul(_z(I8, 2, k), _z(I32, k, 1), _z(*scale), output_dtype=kw.pop("out", F16), **kw)


def _wq(k=64, n=16, x=F16, w=I8, scale=None, **kw):
    return Q.npu_weight_quant_batchmatmul(_z(x, 2, k), _z(w, k, n), _z(*(scale or (x, n))), **kw)


BAD_CALLS = [  # (id, call, message pattern)
    ("dq-int-x", lambda: _dq(x=(I8, 2, 4)), "float16 or bfloat16"),
    ("dq-1d", lambda: _dq(x=(F16, 4)), "more than 1 dimension"),
    ("dq-smooth-shape", lambda: _dq(smooth_scales=_z(F16, 3)), "smooth_scales must be 1-d"),
    ("dq-smooth-dtype", lambda: _dq(smooth_scales=_z(F32, 4)), "smooth_scales must have x's dtype"),
    ("dq-dst", lambda: _dq(dst_type=torch.quint8), "dst_type"),
    ("qz-int-input", lambda: _qz(x=(I8, 2, 4)), "input must be"),
    ("qz-dtype", lambda: _qz(dtype=F16), "dtype="),
    ("qz-mul-uint8", lambda: _qz(s=(F16, 4), dtype=torch.quint8, div=False), "needs div_mode=True"),
    ("qz-scale-len", lambda: _qz(s=(F32, 3)), "1 or input.shape"),
    ("qz-zp-mismatch", lambda: _qz(s=(F16, 4), zp=(F32, 4), div=False), "shape and dtype of scales"),
    ("qz-fp16-scale-div", lambda: _qz(s=(F16, 4)), "scales must be one of"),
    ("tq-dtype", lambda: Q.npu_trans_quant_param(_z(F16, 4)), "float32"),
    ("tq-round-none", lambda: Q.npu_trans_quant_param(_z(F32, 4), None, None), "round_mode=None"),
    ("qmm-int64-bf16", lambda: _qmm(scale=(I64, 3), output_dtype=BF16), "int64 .*scale needs output_dtype int8 or float16"),
    ("qmm-fbias-fp16", lambda: _qmm(bias=_z(F32, 3), output_dtype=F16), "float bias needs output_dtype=torch.bfloat16"),
    ("qmm-fbias-int8", lambda: _qmm(bias=_z(F32, 3)), "float bias needs output_dtype=torch.bfloat16"),
    ("tq-shape", lambda: Q.npu_trans_quant_param(_z(F32, 2, 4)), r"\(t,\) or \(1, n\)"),
    ("tq-round-mode", lambda: Q.npu_trans_quant_param(_z(F32, 4), None, 2), "round_mode"),
    ("tq-offset-len", lambda: Q.npu_trans_quant_param(_z(F32, 4), _z(F32, 3)), "must match"),
    ("i4-dtype", lambda: Q.npu_convert_weight_to_int4pack(_z(I8, 2, 8)), "int32"),
    ("i4-rank", lambda: Q.npu_convert_weight_to_int4pack(_z(I32, 2, 2, 8)), "2-d"),
    ("i4-mult8", lambda: Q.npu_convert_weight_to_int4pack(_z(I32, 2, 12)), "multiple of 8"),
    ("i4-range", lambda: Q.npu_convert_weight_to_int4pack(torch.full((1, 8), 8, dtype=I32)), r"\[-8, 7\]"),
    ("i4-noncontig", lambda: Q.npu_convert_weight_to_int4pack(_z(I32, 8, 16)[:, ::2]), "contiguous"),
    ("qmm-float-x", lambda: Q.npu_quant_matmul(_z(F16, 2, 4), _z(I8, 4, 3), _z(F32, 3)), "int8/int8"),
    ("qmm-rank", lambda: _qmm(x1=(4,)), "2-6 dims"),
    ("qmm-k", lambda: _qmm(x2=(5, 3)), "need be same"),
    ("qmm-k-max", lambda: _qmm(x1=(1, 65536), x2=(65536, 1), scale=(F32, 1)), "<= 65535"),
    ("qmm-n-max", lambda: _qmm(x1=(1, 1), x2=(1, 65536), scale=(F32, 1)), "<= 65535"),
    ("qmm-scale-2d", lambda: _qmm(scale=(F32, 1, 3)), "scale must be 1-d"),
    ("qmm-bf16-scale-fp16", lambda: _qmm(scale=(BF16, 3), output_dtype=F16), "bfloat16 scale needs output_dtype"),
    ("qmm-pertoken-shape", lambda: _qmm(pertoken_scale=_z(F32, 2, 1), output_dtype=F16),
     r"pertoken_scale must be float32 of shape \(m,\)"),
    ("qmm-pertoken-int8", lambda: _qmm(pertoken_scale=_z(F32, 2)), "float output_dtype"),
    ("qmm-int64-pertoken", lambda: _qmm(scale=(I64, 3), pertoken_scale=_z(F32, 2), output_dtype=F16),
     "int64 scale cannot be combined"),
    ("qmm-offset-fp16", lambda: _qmm(offset=_z(F32, 3), output_dtype=F16), "int8 output only"),
    ("qmm-fp16-bias", lambda: _qmm(bias=_z(F16, 3), output_dtype=F16), "float16 bias needs pertoken_scale"),
    ("qmm-bias-shape", lambda: _qmm(bias=_z(F32, 4), output_dtype=BF16), r"bias must be \(n,\)"),
    ("qmm-group", lambda: _qmm(group_sizes=[1, 128, 128]), "group_sizes"),
    ("a8w4-k-group", lambda: _a8w4(k=320), "multiple of 256"),
    ("a8w4-scale-shape", lambda: _a8w4(scale=(I64, 8)), r"scale must be 2-d \(k // 256, n\)"),
    ("a8w4-scale-dtype", lambda: _a8w4(scale=(F32, 1, 8)), "scale must be int64"),
    ("a8w4-pertoken", lambda: _a8w4(pertoken_scale=_z(F32, 2)), r"pertoken_scale must be float32 \(m, 1\)"),
    ("a8w4-offset", lambda: _a8w4(offset=_z(F16, 8)), "offset .yOffset. must be float32"),
    ("a8w4-int8-out", lambda: _a8w4(out=I8), "output_dtype must be"),
    ("a8w4-group-sizes", lambda: _a8w4(group_sizes=[0, 0, 32]), r"\[0, 0, 256\]"),
    ("a8w4-k-max", lambda: _a8w4(k=65792, scale=(I64, 257, 8)), "<= 65535"),
    ("wq-int-x", lambda: _wq(x=I8, scale=(F16, 16)), "float16 or bfloat16"),
    ("wq-rank", lambda: Q.npu_weight_quant_batchmatmul(_z(F16, 1, 2, 64), _z(I8, 64, 16), _z(F16, 16)), "must be 2-d"),
    ("wq-w-dtype", lambda: _wq(w=F16), "weight must be int8 or int32"),
    ("wq-k-max", lambda: _wq(k=65536, n=1), r"\[1, 65535\]"),
    ("wq-n-max", lambda: _wq(k=2, n=65536), r"\[1, 65535\]"),
    ("wq-scale-dtype", lambda: _wq(scale=(F32, 16)), "antiquant_scale must have x's dtype"),
    ("wq-group-mult32", lambda: _wq(scale=(F16, 2, 16), antiquant_group_size=48), "multiple of 32"),
    ("wq-group-ge-k", lambda: _wq(scale=(F16, 1, 16), antiquant_group_size=64), r"\[32, K-1"),
    ("wq-group-shape", lambda: _wq(antiquant_group_size=32), r"\(ceil\(K/g\), N\)"),
    ("wq-scale-shape", lambda: _wq(scale=(F16, 2, 16)), "per-channel"),
    ("wq-offset-shape", lambda: _wq(antiquant_offset=_z(F16, 1, 16)), "antiquant_offset must match"),
    ("wq-bias-dtype", lambda: _wq(x=BF16, bias=_z(BF16, 16)), "bias must be torch.float32"),
    ("wq-quant-scale", lambda: _wq(quant_scale=_z(F32, 16)), "quant_scale"),
]


@pytest.mark.parametrize("call,match", [pytest.param(c, m, id=i) for i, c, m in BAD_CALLS])
def test_argument_errors(call, match):
    with pytest.raises(OpArgumentError, match=match):
        call()
    if match != r"\[-8, 7\]":                      # the int4 value range is data-dependent: real kernel only
        with FakeTensorMode(), pytest.raises(OpArgumentError, match=match):
            call()                                  # the fake kernels reject the same arguments


BATCH_AND_BIAS = [  # torch_npu's meta rules: batch broadcast, bias_shape_check
    ("batch-broadcast", lambda: _qmm(x1=(2, 3, 4), x2=(3, 4, 5), scale=(F32, 5)), "cannot be broadcast"),
    ("3d-bias-2d-out", lambda: _qmm(bias=_z(F32, 2, 1, 3), output_dtype=BF16), "3-d bias needs a 3-d output"),
    ("3d-bias-batch", lambda: _qmm(x1=(2, 2, 4), bias=_z(F32, 3, 1, 3), output_dtype=BF16), "batch dim"),
]


@pytest.mark.parametrize("call,match", [pytest.param(c, m, id=i) for i, c, m in BATCH_AND_BIAS])
def test_quant_matmul_batch_and_bias_shape_rules(call, match):
    with pytest.raises(OpArgumentError, match=match):
        call()


# -- fake kernels ------------------------------------------------------------------------------------
def _fake_cases():
    g = _gen(6)
    x = torch.randn(2, 3, 32, generator=g).to(BF16)
    a8w4 = (_randint(-128, 127, (3, 256), g), _randint(-8, 7, (256, 2), g, I32), _z(I64, 1, 16))
    return [
        ("npu_dynamic_quant", (x,), {}),
        ("npu_quantize", (x, torch.rand(32, generator=g).to(BF16), None, torch.qint8, -1, False), {}),
        ("npu_quantize", (x, torch.rand(3, generator=g) + 0.5, None, torch.quint8, 1), {}),
        ("npu_trans_quant_param", (torch.rand(1), torch.randn(6)), {}),
        ("npu_trans_quant_param", (torch.rand(1, 6), None, 1), {}),
        ("npu_convert_weight_to_int4pack", (_randint(-8, 7, (4, 16), g, I32),), {}),
        *[("npu_quant_matmul", *_qmm_cases()[c]) for c in ("f32-scale-fp16-truncated", "pertoken-bf16-batched",
                                                       "bf16-scale-3d-bias", "int8-out-int64-offset")],
        ("npu_quant_matmul", a8w4, dict(pertoken_scale=torch.rand(3, 1), offset=torch.rand(16), output_dtype=BF16)),
        ("npu_weight_quant_batchmatmul", (x[0], _randint(-8, 7, (32, 2), g, I32), torch.rand(16).to(BF16)), {}),
        ("npu_weight_quant_batchmatmul", (x[0].to(F16), _randint(-9, 9, (32, 5), g), torch.rand(1, 5).to(F16),
                                          torch.rand(1, 5).to(F16), None, None, torch.rand(5).to(F16)), {}),
    ]


@pytest.mark.parametrize("case", range(len(_fake_cases())), ids=[c[0][4:] for c in _fake_cases()])
def test_fake_kernel_matches_real(case):
    name, args, kw = _fake_cases()[case]
    op = getattr(Q, name)
    real = op(*args, **kw)
    with FakeTensorMode() as mode:
        conv = (lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t)
        fake = op(*tree_map(conv, args), **tree_map(conv, kw))
    real, fake = (real, fake) if isinstance(real, tuple) else ((real,), (fake,))
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in real]
    torch.library.opcheck(op, args, kw, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("k", [1, 1024, 1025, 4099])
def test_integer_accumulation_is_exact_for_any_k(k):
    """The float32 chunks must not round: extreme int8 values make every partial sum as large as possible."""
    from qnpu.lowering.ops_matmul import _int_matmul
    g = _gen(k)
    a = _randint(-128, 127, (3, k), g)
    a[0], a[1] = -128, -127
    b = _randint(-128, 127, (k, 5), g)
    b[:, 0], b[:, 1] = -128, -127   # sums of odd products (127^2) near 2^26 would round in one float32 matmul
    want = a.to(torch.int64) @ b.to(torch.int64)
    got = _int_matmul(a, b)
    assert got.dtype == torch.float64 and torch.equal(got.to(torch.int64), want)
