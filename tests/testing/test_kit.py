"""The public property-test kit: strategies produce what they promise, assertions can fail."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qnpu.qcore import QSpec, QTensor, qparams_shape, quantize
from qnpu.testing import (
    activations,
    assert_codes_in_range,
    assert_error_within_step,
    assert_relative_output_error_at_most,
    assert_requantize_exact,
    assert_sqnr_at_least,
    quantization_cases,
    qspecs,
)


@given(quantization_cases())
def test_cases_fit_their_spec(case):
    x, spec = case
    assert x.ndim == 2 and bool(torch.isfinite(x).all())
    qparams_shape(x.shape, spec)  # raises if the group size does not divide the row


@given(qspecs(formats=("int", "uint", "binary")))
def test_specs_are_valid_values(spec):
    assert QSpec.from_dict(spec.to_dict()) == spec


@given(activations(tokens=st.just(64), channels=st.just(32), max_outlier_channels=4))
def test_activations_have_correlated_channels(x):
    assert x.shape == (64, 32)
    corr = torch.corrcoef(x.T)
    off = corr - torch.diag(torch.diag(corr))
    assert float(off.abs().max()) > 0.2  # mixed channels: the Hessian is not diagonal


def test_activations_can_have_outlier_channels():
    from hypothesis import find

    x = find(activations(tokens=st.just(32), channels=st.just(16)),
             lambda a: float(a.abs().amax(0).max() / a.abs().amax(0).median()) > 10)
    assert x.shape == (32, 16)


def test_assertions_detect_broken_quantizers():
    x = torch.linspace(-1, 1, 16).reshape(2, 8)
    q = quantize(x, QSpec(bits=4))
    broken = QTensor(torch.clamp(q.codes.to(torch.int16) + 1, -8, 7).to(torch.int8), q.scale, None, q.spec)
    with pytest.raises(AssertionError, match="scale"):
        assert_error_within_step(x, broken)
    with pytest.raises(ValueError, match="outside the 4-bit int range"):  # QTensor itself refuses them
        QTensor(torch.full((2, 8), 9, dtype=torch.int8), q.scale, None, q.spec)
    from types import SimpleNamespace  # a user's own container with codes and a spec
    out_of_range = SimpleNamespace(codes=torch.full((2, 8), 9, dtype=torch.int8), scale=q.scale, spec=q.spec)
    with pytest.raises(AssertionError, match="codes outside"):
        assert_codes_in_range(out_of_range)
    with pytest.raises(AssertionError, match="SQNR"):
        assert_sqnr_at_least(x, broken.dequantize(), 40.0)
    with pytest.raises(AssertionError, match="relative output error"):
        assert_relative_output_error_at_most(torch.ones(3, 8), x, broken.dequantize(), 0.01)
    assert_requantize_exact(q)
