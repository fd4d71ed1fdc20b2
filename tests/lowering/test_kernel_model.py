"""The CATLASS kernels' numerics model against the reference ops (docs/architecture.md, "CATLASS kernels").

W8A8 and per-channel W4A8 must equal the reference bit for bit (exact int32 accumulation, the
same fp32 epilogue order); per-group W4A8 accumulates K groups in fp32 and must pass CATLASS's
golden criterion against the reference over hypothesis-drawn shapes, K not a multiple of the
512-wide L1 tile, and group sizes 32..256. The fp16 (fixpipe) alternative is held to its
rounding bound.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qnpu.lowering  # noqa: F401  (registers torch.ops.qnpu)
from qnpu.lowering.ascend import kernel_model as km
from qnpu.lowering.library import OpArgumentError

ops = torch.ops.qnpu
CSRC = Path(km.__file__).parent / "csrc"


def _inputs(seed, m, k, n, w_lo=-128, w_hi=128):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(w_lo, w_hi, (k, n), generator=g, dtype=torch.int8)
    scale = torch.rand(n, generator=g) * 1e-3 + 1e-5
    tok = torch.rand(m, generator=g) * 2e-2 + 1e-4
    bias = torch.randn(n, generator=g)
    return x, w, scale, tok, bias


# -- tiling ------------------------------------------------------------------------------------
@pytest.mark.parametrize("tiling", [km.W8A8_TILING, km.W4A8_TILING])
def test_chosen_tilings_fit_the_a2_buffers(tiling):
    tiling.check()
    used = tiling.buffers()
    assert used["L0C"] == 128 * 256 * 4 == km.A2_BUFFERS["L0C"]       # the block fills L0C exactly
    assert used["L1"] == 2 * (128 * 512 + 512 * 256) <= km.A2_BUFFERS["L1"]


def test_w4a8_prologue_and_epilogue_share_ub_without_overlap():
    used = km.W4A8_TILING.buffers()["UB"]
    assert used == 7 * 8192 + 64 * 256 * 4 + 32 * 256 * 8 + 256 * 4 <= km.A2_BUFFERS["UB"]
    # example 32's cast length would leave no room for the fp32 accumulator above it
    with pytest.raises(km.TilingError, match="UB"):
        km.Tiling("ex32", l1=(128, 256, 512), l0=(128, 256, 128), epilogue=(32, 256),
                  prologue_cast_len=24 * 1024).check()
    text = (CSRC / "kernels" / "w4a8.cpp").read_text()
    assert "CAST_COMPUTE_LEN = 32 * L1TileShape::N" in text and km.W4A8_TILING.prologue_cast_len == 32 * 256
    assert "PROLOGUE_UB_BYTES = 2 * (CAST_COMPUTE_LEN / 2 + CAST_COMPUTE_LEN + CAST_COMPUTE_LEN * 2)" in text


@pytest.mark.parametrize("l1,l0,what", [((256, 256, 512), (256, 256, 128), "L0C"),   # 256 KiB of int32
                                        ((128, 256, 1024), (128, 256, 128), "L1"),
                                        ((128, 256, 512), (128, 256, 256), "L0B"),
                                        ((128, 256, 480), (128, 256, 48), "multiples")])
def test_tilings_that_do_not_fit_are_refused(l1, l0, what):
    with pytest.raises(km.TilingError, match=what):
        km.Tiling("bad", l1=l1, l0=l0, epilogue=(32, 256)).check()


def _cpp_shape(text: str, name: str) -> tuple[int, ...]:
    found = re.findall(rf"using {name}\s*=\s*(?:Gemm|Matrix)Shape<\s*(\d+),\s*(\d+)(?:,\s*(\d+))?\s*>", text)
    assert len(found) == 1, f"{name} must be declared once; found {found}"
    return tuple(int(v) for v in found[0] if v)


@pytest.mark.parametrize("source,tiling", [("w8a8_per_token.cpp", km.W8A8_TILING), ("w4a8.cpp", km.W4A8_TILING)])
def test_the_model_describes_the_cpp_tiles(source, tiling):
    text = (CSRC / "kernels" / source).read_text()
    assert _cpp_shape(text, "L1TileShape") == tiling.l1
    assert _cpp_shape(text, "L0TileShape") == tiling.l0
    assert _cpp_shape(text, "EpilogueTileShape") == tiling.epilogue


# -- W8A8 per token: bit-identical to the reference -------------------------------------------
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(1, 40), k=st.integers(1, 1300), n=st.integers(1, 300),
       out=st.sampled_from([torch.float16, torch.bfloat16]), with_bias=st.booleans())
def test_w8a8_model_equals_the_reference_bit_for_bit(seed, m, k, n, out, with_bias):
    x, w, scale, tok, bias = _inputs(seed, m, k, n)
    want = ops.npu_quant_matmul(x, w, scale, pertoken_scale=tok, output_dtype=out)
    if not with_bias:
        got = km.w8a8_per_token(x, w, scale, tok, None, out)
        assert got.dtype == out and torch.equal(got, want)
        return
    # the wrapper adds the bias after the kernel's rounding: one more rounding than the reference's
    # fused bias (an error relative to the pre-bias value, so unbounded relative to a cancelled sum)
    got = km.w8a8_per_token(x, w, scale, tok, bias, out)
    assert torch.equal(got, ((want.float() + bias).to(out)))


def test_w8a8_int32_accumulation_is_exact_past_2_24():
    # |sum| = 1300 * 127 * 127 > 2^24: an fp32 accumulator would round, the L0C int32 does not
    k = 1300
    x = torch.full((1, k), 127, dtype=torch.int8)
    w = torch.full((k, 1), 127, dtype=torch.int8)
    w[0, 0] = 126
    c = km.l0c_accumulate(x, w, 512)
    assert int(c) == 127 * 127 * k - 127
    assert float(torch.tensor(127.0 * 127 * k - 127, dtype=torch.float32)) != 127 * 127 * k - 127


def test_l0c_overflow_is_reported_not_wrapped():
    x = torch.full((1, 2), 127, dtype=torch.int8)
    w = torch.full((2, 1), 127, dtype=torch.int8)
    with pytest.raises(OverflowError):
        km.l0c_accumulate(x.repeat(1, 70000), w.repeat(70000, 1), 512 * 200)


# -- W4A8 ---------------------------------------------------------------------------------------
def _w4(seed, m, k, n):
    x, w, _, tok, bias = _inputs(seed, m, k, n, w_lo=-8, w_hi=8)
    return x, ops.npu_convert_weight_to_int4pack(w.to(torch.int32)), tok, bias


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(1, 40), k=st.integers(1, 1300),
       n8=st.integers(1, 24), out=st.sampled_from([torch.float16, torch.bfloat16]), with_bias=st.booleans())
def test_w4a8_per_channel_model_equals_the_reference_bit_for_bit(seed, m, k, n8, out, with_bias):
    n = 8 * n8
    x, wp, tok, bias = _w4(seed, m, k, n)
    scale = torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 1e-2 + 1e-4
    bias = bias if with_bias else None
    want = km.add_bias(ops.w4a8_matmul(x, wp, scale, tok, output_dtype=out), bias)
    assert torch.equal(km.w4a8(x, wp, scale, tok, bias, 0, out), want)
    # and the reference op is the per-token int8 matmul on widened weights
    from qnpu.qcore import unpack_int4
    widened = unpack_int4(wp, dim=-1).to(torch.int8)
    assert torch.equal(want, km.add_bias(ops.npu_quant_matmul(x, widened, scale, pertoken_scale=tok, output_dtype=out),
                                         bias))


def _group_partials_abs_sum(x, wp, scale, tok, group):
    """sum_g |scale_g * (x @ W)_g| * pertoken: the magnitude fp16 group accumulation rounds against."""
    from qnpu.qcore import unpack_int4
    w = unpack_int4(wp, dim=-1).to(torch.float64)
    parts = [(x[:, g * group:(g + 1) * group].to(torch.float64) @ w[g * group:(g + 1) * group]).abs()
             * scale[g].to(torch.float64) for g in range(scale.shape[0])]
    return torch.stack(parts).sum(0) * tok.to(torch.float64)[:, None]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(1, 24), groups=st.integers(2, 12),
       group=st.sampled_from(list(range(32, 257, 32))), n8=st.integers(1, 16),
       out=st.sampled_from([torch.float16, torch.bfloat16]))
def test_w4a8_per_group_kernel_passes_the_catlass_golden_check(seed, m, groups, group, n8, out):
    n, k = 8 * n8, groups * group
    x, wp, tok, _ = _w4(seed, m, k, n)
    scale = torch.rand(groups, n, generator=torch.Generator().manual_seed(seed + 1)) * 2e-2 + 1e-3
    want = ops.w4a8_matmul(x, wp, scale, tok, group_size=group, output_dtype=torch.float32)
    got = km.w4a8(x, wp, scale, tok, None, group, out)
    assert got.dtype == out
    assert km.catlass_errors(got, want, k) == 0
    # and it is the fp32 sequential group sum, not the exact one: equal to the model's own steps
    from qnpu.qcore import unpack_int4
    w = unpack_int4(wp, dim=-1)
    acc = None
    for g in range(groups):
        part = km.l0c_accumulate(x[:, g * group:(g + 1) * group], w[g * group:(g + 1) * group], 512).float() * scale[g]
        acc = part if acc is None else acc + part
    assert torch.equal(got, (acc * tok[:, None]).to(out))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(1, 24), groups=st.integers(2, 12),
       group=st.sampled_from(list(range(32, 257, 32))), n8=st.integers(1, 16),
       out=st.sampled_from([torch.float16, torch.bfloat16]))
def test_w4a8_fp16_accumulation_alternative_is_within_its_rounding_bound(seed, m, groups, group, n8, out):
    """The error is within the rounding of fp19 scales (2^-10), G fp16 roundings of the running
    sum (2^-11 each, against sum_g |partial_g|) and the final cast. (CATLASS's golden check
    against the exact reference fails on a few cancelling elements: benchmarks/kernel_model_accuracy.py.)"""
    n, k = 8 * n8, groups * group
    x, wp, tok, _ = _w4(seed, m, k, n)
    scale = torch.rand(groups, n, generator=torch.Generator().manual_seed(seed + 1)) * 2e-2 + 1e-3
    want = ops.w4a8_matmul(x, wp, scale, tok, group_size=group, output_dtype=torch.float32)
    got = km.w4a8(x, wp, scale, tok, None, group, out, accumulate="fp16")
    assert got.dtype == out
    mag = _group_partials_abs_sum(x, wp, scale, tok, group)
    cast = 2.0 ** -8 if out == torch.bfloat16 else 2.0 ** -11
    bound = mag * (2.0 ** -10 + groups * 2.0 ** -11) + want.abs().to(torch.float64) * 2 * cast + 1e-6
    assert torch.all((got.to(torch.float64) - want.to(torch.float64)).abs() <= bound)


def test_fp16_accumulation_rounds_where_the_kernel_does_not():
    # groups of 32: 64 * 32 * 1 = 2048 (scale 1), then two groups that each add exactly 1
    g, n = 32, 8
    x = torch.full((1, 3 * g), 64, dtype=torch.int8)
    w = torch.zeros(3 * g, n, dtype=torch.int32)
    w[:g] = 1
    w[g, :] = 1
    w[2 * g, :] = 1
    scale = torch.tensor([[1.0] * n, [1 / 64] * n, [1 / 64] * n])
    tok = torch.tensor([2.0 ** -10])
    wp = ops.npu_convert_weight_to_int4pack(w)
    ref = ops.w4a8_matmul(x, wp, scale, tok, group_size=g)
    fp16 = km.w4a8(x, wp, scale, tok, None, g, torch.float16, accumulate="fp16")
    assert torch.all(ref == 2050 / 1024)        # exact accumulation
    assert torch.all(km.w4a8(x, wp, scale, tok, None, g, torch.float16) == 2050 / 1024)   # the kernel: fp32
    assert torch.all(fp16 == 2.0)               # 2048 + 1 ties to 2048 in fp16, twice


def test_fp16_alternative_uses_the_fp19_scale_of_the_fixpipe():
    g, n = 32, 8
    x = torch.ones((1, 2 * g), dtype=torch.int8)
    w = torch.ones((2 * g, n), dtype=torch.int32)
    s = 1.0 + 2.0 ** -12                         # lost by the fp19 truncation
    scale = torch.full((2, n), s)
    wp = ops.npu_convert_weight_to_int4pack(w)
    fixpipe = km.w4a8(x, wp, scale, torch.ones(1), None, g, torch.float16, accumulate="fp16")
    assert torch.all(fixpipe == 64.0)
    assert torch.all(ops.w4a8_matmul(x, wp, scale, torch.ones(1), group_size=g, output_dtype=torch.float32) > 64.0)


def test_fp16_alternative_overflow_is_reported():
    g, n = 32, 8
    x = torch.full((1, 2 * g), 127, dtype=torch.int8)
    wp = ops.npu_convert_weight_to_int4pack(torch.full((2 * g, n), 7, dtype=torch.int32))
    with pytest.raises(OverflowError, match="fp16"):
        km.w4a8(x, wp, torch.full((2, n), 4.0), torch.ones(1), None, g, torch.float16, accumulate="fp16")


def test_round_fp16_rounds_once_half_to_even():
    x = torch.tensor([2049.0, 2051.0, 2.0 ** -25, 3 * 2.0 ** -25, -2049.0, 65504.0], dtype=torch.float64)
    assert round_list(km.round_fp16(x)) == [2048.0, 2052.0, 0.0, 2.0 ** -23, -2048.0, 65504.0]
    # a value that float64 -> float32 -> float16 rounds twice: 1 + 2^-11 + 2^-40 rounds up once
    y = torch.tensor([1 + 2.0 ** -11 + 2.0 ** -40], dtype=torch.float64)
    assert float(km.round_fp16(y)) == 1 + 2.0 ** -10
    assert float(y.to(torch.float32).to(torch.float16)) == 1.0
    with pytest.raises(OverflowError):
        km.round_fp16(torch.tensor([65520.0], dtype=torch.float64))


def round_list(t):
    return [float(v) for v in t]


# -- the reference w4a8_matmul op's contract --------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [({"group_size": 48}, "multiple of 32"),
                                          ({"group_size": 96}, "multiple of group_size"),
                                          ({"output_dtype": torch.int8}, "output_dtype")])
def test_w4a8_matmul_refuses_bad_arguments(kwargs, match):
    x, wp, tok, _ = _w4(0, 2, 128, 8)
    scale = torch.ones(128 // kwargs.get("group_size", 128) if kwargs.get("group_size") else 8)
    if kwargs.get("group_size"):
        scale = torch.ones(2, 8)
    with pytest.raises(OpArgumentError, match=match):
        ops.w4a8_matmul(x, wp, scale, tok, **kwargs)


def test_w4a8_matmul_reference_is_the_dequantized_product():
    x, wp, tok, bias = _w4(3, 5, 256, 16)
    from qnpu.qcore import unpack_int4
    w = unpack_int4(wp, dim=-1).to(torch.float64)
    scale = torch.rand(2, 16, dtype=torch.float32) + 0.5
    want = (x.to(torch.float64) @ (w * scale.to(torch.float64).repeat_interleave(128, 0))) * tok.to(torch.float64)[:, None]
    got = ops.w4a8_matmul(x, wp, scale, tok, group_size=128, output_dtype=torch.float32)
    torch.testing.assert_close(got.to(torch.float64), want, rtol=2e-7, atol=1e-6)


# -- the golden criterion ---------------------------------------------------------------------
def test_catlass_errors_is_the_golden_rule():
    g = torch.tensor([0.5, 100.0, 100.0, -300.0])
    a = torch.tensor([0.5 + 0.9 / 256, 100.0 + 99 / 256, 100.0 + 101 / 256, -300.0])
    assert km.catlass_errors(a, g, 1000) == 1           # only the third: beyond 100/256
    assert km.catlass_errors(a, g, 4096) == 0           # 1/128 from k = 2048
    assert km.catlass_tolerance(2047) == (1 / 256, 1.0) and km.catlass_tolerance(2048) == (1 / 128, 1.0)
    assert km.catlass_tolerance(2047, torch.bfloat16) == (1 / 128, 1 / 256)
    # bf16 results: 1/128 relative, floor 1/256 (an fp16 result would pass both on the floor of 1)
    gb = torch.tensor([0.01, 0.5, 0.001])
    ab = torch.tensor([0.0105, 0.5 + 0.5 / 128 * 0.5, 0.001 + 1 / 256 / 128 * 0.5])
    assert km.catlass_errors(ab.to(torch.bfloat16), gb, 1000) == 1          # the first, beyond 0.01 / 128
    assert km.catlass_errors(ab.to(torch.float16), gb, 1000) == 0


@pytest.mark.parametrize("group", [32, 256, 1024, 2048])
def test_w4a8_matmul_reference_group_sums_are_exact_for_every_group_size(group):
    # the batched path (groups <= 1024) and the chunked loop (larger groups) both sum exact integers:
    # all-max operands make every group sum 127 * 7 * group; scales 1 and 2 give 3 times that
    k, n = 2 * group, 8
    x = torch.full((2, k), 127, dtype=torch.int8)
    wp = ops.npu_convert_weight_to_int4pack(torch.full((k, n), 7, dtype=torch.int32))
    scale = torch.tensor([[1.0] * n, [2.0] * n])
    got = ops.w4a8_matmul(x, wp, scale, torch.ones(2), group_size=group, output_dtype=torch.float32)
    assert torch.all(got == float(127 * 7 * group * 3))
