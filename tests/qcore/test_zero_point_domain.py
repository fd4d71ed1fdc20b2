"""Zero points carry their domain (QSpec.zero_point_domain): integer zero points are never truncated
from floats, float zero points (Ascend's antiquant_offset) stay unrounded; packed_nbytes is exact."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qnpu.qcore import QSpec, QTensor, choose_qparams, dequantize, quantize, zero_point_in_domain
from qnpu.testing import assert_codes_in_range, assert_error_within_step, assert_grid_fits, quantization_cases, qspecs

UINT4 = QSpec(bits=4, format="uint", symmetric=False)
UINT4_FLOAT = UINT4.replace(zero_point_domain="float")


@pytest.mark.parametrize("x, spec, nbytes", [
    # codes 64 x 96 x 4 bits = 3072 B; 64 x 3 fp32 scales = 768 B
    (torch.randn(64, 96), QSpec(bits=4, granularity="group", group_size=32, axis=-1), 3072 + 768),
    # + 192 integer zero points, one byte each
    (torch.randn(64, 96), QSpec(bits=4, format="uint", symmetric=False, granularity="group", group_size=32, axis=-1),
     3072 + 768 + 192),
    # 5 codes x 3 bits = 15 bits -> 2 bytes; one fp32 scale
    (torch.randn(1, 5), QSpec(bits=3, granularity="tensor"), 2 + 4),
    # float64 input: float64 scales, 8 bytes each
    (torch.randn(3, 5, dtype=torch.float64), QSpec(bits=8), 15 + 3 * 8),
    # float zero points in their dtype: 4 codes of 4 bits, 2 fp32 scales, 2 fp32 zero points
    (torch.randn(2, 2), UINT4_FLOAT, 2 + 8 + 8),
    # a symmetric uint spec carries its fixed zero point (2^(b-1)) per channel: one byte each
    (torch.randn(2, 8), QSpec(bits=4, format="uint"), 8 + 8 + 2),
])
def test_packed_nbytes_is_exact(x, spec, nbytes):
    assert quantize(x, spec).packed_nbytes == nbytes


def test_a_fractional_zero_point_is_refused_in_the_integer_domain():
    x = torch.randn(4, 8)
    scale, zp = choose_qparams(x, UINT4)
    with pytest.raises(ValueError, match="would truncate"):
        quantize(x, UINT4, scale=scale, zero_point=zp.to(torch.float32) + 0.25)
    with pytest.raises(ValueError, match="would truncate"):
        QTensor(quantize(x, UINT4).codes, scale, zp.to(torch.float32) + 0.5, UINT4)
    whole = quantize(x, UINT4, scale=scale, zero_point=zp.to(torch.float64))  # whole numbers: exact
    assert whole.zero_point.dtype == torch.int32 and torch.equal(whole.codes, quantize(x, UINT4).codes)
    with pytest.raises(ValueError, match="would truncate"):
        zero_point_in_domain(torch.tensor([1.0, float("nan")]), UINT4)


def test_float_zero_points_are_kept_unrounded():
    x = torch.tensor([[-0.3, 0.1, 0.9, 2.0], [-1.0, -0.2, 0.05, 0.7]])
    q = quantize(x, UINT4_FLOAT)
    scale, zp = choose_qparams(x, UINT4_FLOAT)
    assert zp.is_floating_point() and torch.equal(q.zero_point, zp)
    assert bool((zp != torch.round(zp)).any())  # a fraction survives
    assert torch.equal(q.codes.amin(1), torch.zeros(2, dtype=q.codes.dtype))  # lo lands exactly on qmin
    torch.testing.assert_close(dequantize(q), (q.codes.float() - zp) * scale)
    assert_error_within_step(x, q)
    assert_grid_fits(x, q)


@given(quantization_cases(qspecs(symmetric=st.just(False))))
def test_float_domain_keeps_the_half_step_bound(case):
    x, spec = case
    q = quantize(x, spec.replace(zero_point_domain="float"))
    assert_codes_in_range(q)
    assert_error_within_step(x, q)
    assert_grid_fits(x, q)


def test_the_domain_is_validated_and_round_trips():
    with pytest.raises(ValueError, match="zero_point_domain"):
        QSpec(bits=4, zero_point_domain="float")  # symmetric: the zero point is fixed
    with pytest.raises(ValueError, match="zero_point_domain"):
        QSpec(bits=4, symmetric=False, zero_point_domain="fp16")
    assert "zero_point_domain" not in UINT4.to_dict()  # files written before the field read the same
    assert QSpec.from_dict(UINT4_FLOAT.to_dict()) == UINT4_FLOAT


def test_gptq_qparams_and_compressed_tensors_refuse_to_truncate(tmp_path):
    from qnpu.lowering.compressed_tensors import layer_state
    from qnpu.transforms.gptq import _given_qparams

    spec = QSpec(bits=4, format="uint", symmetric=False)
    with pytest.raises(ValueError, match="would truncate"):
        _given_qparams("gptq", "layer", spec, (4, 8), (torch.ones(4, 1), torch.full((4, 1), 7.5)), torch.float32)
    q = quantize(torch.randn(4, 8), UINT4_FLOAT)
    with pytest.raises(ValueError, match="integer zero points"):
        layer_state("layer", SimpleNamespace(qweight=q), "W4A16", torch.float32)


def test_a_checkpoint_keeps_float_zero_points_bit_exactly(tmp_path):
    from qnpu.models.checkpoint import Checkpoint, CheckpointWriter

    q = quantize(torch.randn(8, 16), UINT4_FLOAT.replace(granularity="group", group_size=8, axis=-1))
    with CheckpointWriter(tmp_path / "ckpt", source={}, recipe={}, hf_config={}) as writer:
        writer.add({}, {"layers.0.q": {"qweight": q, "act_spec": None}})
        writer.close()
    back = Checkpoint(tmp_path / "ckpt").qlinears()["layers.0.q"]["qweight"]
    assert back.spec == q.spec and back.zero_point.dtype == q.zero_point.dtype
    assert torch.equal(back.zero_point, q.zero_point) and torch.equal(back.dequantize(), q.dequantize())
