import math

import pytest
import torch
from hypothesis import example, given, target
from hypothesis import strategies as st

from qnpu.qcore import (
    QSpec,
    QTensor,
    choose_qparams,
    dequantize,
    fake_quantize,
    fake_quantize_ste,
    qparams_shape,
    quantize,
    sqnr_db,
)
from qnpu.qcore.layout import expand
from qnpu.testing import (
    assert_codes_in_range,
    assert_error_within_step,
    assert_requantize_exact,
    quantization_cases,
    qspecs,
    tensors,
)


@given(quantization_cases())
@example((torch.zeros(3, 8), QSpec(bits=4)))
@example((torch.zeros(2, 8), QSpec(bits=3, symmetric=False, format="uint")))
@example((torch.tensor([[0.0, 0.0], [1.0, -1.0]]), QSpec(bits=8, granularity="token", dynamic=True)))
def test_codes_in_range_and_error_within_half_step(case):
    x, spec = case
    q = quantize(x, spec)
    assert_codes_in_range(q)
    assert_error_within_step(x, q)
    err = (x.double() - dequantize(q, torch.float64)).abs()
    target(float((err / expand(q.scale, x.shape, spec).double()).max()), label="error / scale")


@given(quantization_cases())
def test_requantizing_with_the_same_parameters_is_exact(case):
    x, spec = case
    assert_requantize_exact(quantize(x, spec))


@given(quantization_cases(qspecs(clip_ratios=st.just(1.0))))
def test_without_clipping_every_element_is_within_half_a_step(case):
    x, spec = case
    q = quantize(x, spec)
    err = (x.double() - dequantize(q, torch.float64)).abs()
    s = expand(q.scale, x.shape, spec).double()
    assert bool((err <= 0.5 * s + 1e-6 * (x.double().abs() + s)).all())


@given(quantization_cases(), st.integers(0, 2**32 - 1))
def test_stochastic_rounding_is_seeded_and_within_one_step(case, seed):
    x, spec = case
    q1 = quantize(x, spec, rounding="stochastic", generator=torch.Generator().manual_seed(seed))
    q2 = quantize(x, spec, rounding="stochastic", generator=torch.Generator().manual_seed(seed))
    assert torch.equal(q1.codes, q2.codes)
    assert_codes_in_range(q1)
    assert_error_within_step(x, q1, step_fraction=1.0)


def test_stochastic_rounding_is_unbiased():
    x = torch.full((200_000,), 0.3)
    spec = QSpec(bits=8, granularity="tensor")
    scale = torch.tensor(1.0)
    q = quantize(x, spec, scale=scale, rounding="stochastic", generator=torch.Generator().manual_seed(0))
    assert set(q.codes.unique().tolist()) == {0, 1}
    assert abs(float(dequantize(q).mean()) - 0.3) < 0.005  # binomial std ~ 0.001


def test_stochastic_rounding_needs_a_generator():
    with pytest.raises(ValueError, match="generator"):
        quantize(torch.randn(4, 4), QSpec(bits=4), rounding="stochastic")


def test_rounding_is_half_to_even():
    spec = QSpec(bits=8, granularity="tensor")
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5])
    q = quantize(x, spec, scale=torch.tensor(1.0))
    assert q.codes.tolist() == [0, 2, 2, 0, -2, -2]


@given(tensors(st.tuples(st.integers(1, 16), st.integers(1, 8).map(lambda k: 8 * k))), st.integers(1, 8))
def test_group_of_the_whole_row_equals_per_channel(x, bits):
    bits = max(bits, 2)
    per_group = quantize(x, QSpec(bits=bits, granularity="group", group_size=x.shape[1], axis=-1))
    per_channel = quantize(x, QSpec(bits=bits, granularity="channel", axis=0))
    assert per_group.scale.shape == per_channel.scale.shape
    assert torch.equal(per_group.scale, per_channel.scale)
    assert torch.equal(per_group.codes, per_channel.codes)


@given(tensors(st.tuples(st.integers(2, 32), st.integers(8, 64)),
               kinds=("gaussian", "heavy_tailed", "uniform")))
def test_int8_has_higher_sqnr_than_int4(x):
    # continuous data off the grid (sparse or constant rows can be exact at both widths)
    hi = sqnr_db(x, fake_quantize(x, QSpec(bits=8)))
    lo = sqnr_db(x, fake_quantize(x, QSpec(bits=4)))
    assert math.isfinite(lo) and hi > lo


def test_granularity_shapes():
    shape = (6, 12)
    assert qparams_shape(shape, QSpec(granularity="tensor")) == ()
    assert qparams_shape(shape, QSpec(granularity="channel", axis=0)) == (6, 1)
    assert qparams_shape(shape, QSpec(granularity="channel", axis=1)) == (1, 12)
    assert qparams_shape(shape, QSpec(granularity="group", group_size=4, axis=-1)) == (6, 3)
    assert qparams_shape(shape, QSpec(granularity="group", group_size=3, axis=0)) == (2, 12)
    assert qparams_shape((2, 5, 12), QSpec(granularity="token", dynamic=True)) == (2, 5, 1)


def test_per_token_scale_follows_each_row():
    x = torch.tensor([[1.0, -2.0, 0.5], [10.0, 3.0, -4.0]])
    q = quantize(x, QSpec(bits=8, granularity="token", dynamic=True))
    assert torch.allclose(q.scale.squeeze(1), torch.tensor([2.0, 10.0]) / 127)


def test_asymmetric_parameters_cover_min_and_max():
    x = torch.tensor([[-1.0, 0.0, 3.0]])
    scale, zp = choose_qparams(x, QSpec(bits=8, format="uint", symmetric=False))
    assert torch.allclose(scale, torch.tensor([[4.0 / 255]]))
    assert zp.tolist() == [[round(255 / 4)]]


def test_zero_tensor_quantizes_to_zeros_without_nan():
    for spec in [QSpec(bits=4), QSpec(bits=8, format="uint", symmetric=False),
                 QSpec(bits=1, format="binary"), QSpec(bits=8, granularity="token", dynamic=True)]:
        x = torch.zeros(3, 4)
        q = quantize(x, spec)
        assert bool(torch.isfinite(q.scale).all())
        assert torch.equal(dequantize(q), x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_is_rejected(bad):
    x = torch.randn(4, 4)
    x[1, 2] = bad
    with pytest.raises(ValueError, match=r"^x has .*allowed values: finite"):
        quantize(x, QSpec(bits=8))


def test_group_size_must_divide_the_axis():
    with pytest.raises(ValueError, match=r"group_size=128 .* 576.*allowed group sizes: \[1, 2, 3"):
        quantize(torch.randn(4, 576), QSpec(bits=4, granularity="group", group_size=128, axis=-1))


def test_bad_arguments_are_rejected():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="rounding"):
        quantize(x, QSpec(bits=4), rounding="floor")
    with pytest.raises(ValueError, match="axis"):
        quantize(x, QSpec(bits=4, axis=2))
    with pytest.raises(ValueError, match="floating-point"):
        quantize(torch.ones(4, 8, dtype=torch.int32), QSpec(bits=4))
    with pytest.raises(ValueError, match="scale"):
        quantize(x, QSpec(bits=4), scale=torch.zeros(4, 1))
    with pytest.raises(ValueError, match="zero_point"):
        quantize(x, QSpec(bits=4, symmetric=False), scale=torch.ones(4, 1))


@given(quantization_cases(), st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]))
def test_inputs_are_not_mutated_and_dtypes_kept(case, dtype):
    x, spec = case
    x = x.to(dtype)
    before = x.clone()
    fq = fake_quantize(x, spec)
    assert torch.equal(x, before)
    assert fq.dtype == dtype and fq.shape == x.shape


@given(tensors(st.tuples(st.integers(1, 8), st.integers(1, 32))))
def test_binary_codes_and_l2_optimal_scale(x):
    spec = QSpec(bits=1, format="binary", granularity="channel", axis=0)
    q = quantize(x, spec)
    assert_codes_in_range(q)
    err = float(((x - dequantize(q)) ** 2).sum())
    for factor in (0.9, 1.1):  # alpha = mean|x| minimises ||x - alpha sign(x)||^2
        worse = QTensor(q.codes, q.scale * factor, None, spec)
        assert err <= float(((x - dequantize(worse)) ** 2).sum()) * (1 + 1e-5) + 1e-12


def test_straight_through_estimator_passes_gradients():
    x = torch.randn(4, 8, requires_grad=True)
    y = fake_quantize_ste(x, QSpec(bits=4))
    assert torch.equal(y.detach(), fake_quantize(x.detach(), QSpec(bits=4)))
    (y * torch.arange(8.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(8.0).expand(4, 8))


def test_qtensor_is_a_frozen_pytree():
    import dataclasses

    from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

    q = quantize(torch.randn(4, 8), QSpec(bits=4, symmetric=False, format="uint"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.codes = q.codes
    leaves, spec_tree = tree_flatten({"w": q})
    assert len(leaves) == 3
    back = tree_unflatten(leaves, spec_tree)["w"]
    assert torch.equal(back.dequantize(), q.dequantize())
    doubled = tree_map(lambda t: t * 2 if t.is_floating_point() else t, {"w": q})["w"]
    assert torch.equal(doubled.dequantize(), 2 * q.dequantize())


def test_qtensor_rejects_inconsistent_parts():
    with pytest.raises(ValueError, match="scale has shape"):
        QTensor(torch.zeros(4, 8, dtype=torch.int8), torch.ones(4), None, QSpec(bits=4))
    with pytest.raises(ValueError, match="integer"):
        QTensor(torch.zeros(4, 8), torch.ones(4, 1), None, QSpec(bits=4))


def test_qtensor_refuses_codes_outside_its_spec_and_non_finite_scales():
    """A damaged checkpoint must not load and evaluate silently (ppl 48399 / nan)."""
    from qnpu.qcore import QTensor
    spec = QSpec(bits=4)
    ok = QTensor(torch.tensor([[-8, 7]], dtype=torch.int8), torch.ones(1, 1), None, spec)
    assert ok.codes.shape == (1, 2)
    with pytest.raises(ValueError, match=r"codes span \[-8, 9\], outside the 4-bit int range \[-8, 7\]"):
        QTensor(torch.tensor([[-8, 9]], dtype=torch.int8), torch.ones(1, 1), None, spec)
    with pytest.raises(ValueError, match="scale has NaN/Inf"):
        QTensor(torch.tensor([[1, 2]], dtype=torch.int8), torch.full((1, 1), float("nan")), None, spec)
