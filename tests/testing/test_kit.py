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


# -- the README's property test against quantizers with planted bugs ---------------------------------
def _readme_property(quantizer):
    """The README's property test on ``quantizer``, under the ``ci`` profile (25 derandomized examples)."""
    from hypothesis import settings

    from qnpu.testing import assert_grid_fits, with_edge_cases

    @settings(settings.get_profile("ci"))
    @given(quantization_cases())
    @with_edge_cases
    def check(case):
        x, spec = case
        q = quantizer(x, spec)
        assert_codes_in_range(q)
        assert_error_within_step(x, q)
        assert_grid_fits(x, q)

    return check


def _rescaled(factor):
    def quantizer(x, spec):
        q = quantize(x, spec)
        return quantize(x, spec, scale=q.scale * factor, zero_point=q.zero_point)
    return quantizer


def _zero_point_shifted(x, spec):
    q = quantize(x, spec)
    if q.zero_point is None:
        return q
    return quantize(x, spec, scale=q.scale, zero_point=q.zero_point + 1)


def _int4_clamped_one_high(x, spec):
    """Clamps int4 codes to [-8, 8] (its own container: a QTensor refuses a code of +8)."""
    from types import SimpleNamespace

    from qnpu.qcore.layout import expand

    q = quantize(x, spec)
    high = spec.qmax + (spec.bits == 4 and spec.format == "int")
    z = 0 if q.zero_point is None else expand(q.zero_point, x.shape, spec)
    codes = torch.clamp(torch.round(x.double() / expand(q.scale, x.shape, spec)) + z, spec.qmin, high)
    return SimpleNamespace(codes=codes.to(torch.int16), scale=q.scale, zero_point=q.zero_point, spec=spec,
                           dtype=x.dtype)


def test_the_readme_property_test_passes_qnpu_quantize():
    _readme_property(quantize)()


@pytest.mark.parametrize("quantizer", [_rescaled(2.0), _rescaled(0.5), _rescaled(1.25), _zero_point_shifted,
                                       _int4_clamped_one_high],
                         ids=["scale-2x", "scale-half", "scale-1.25x", "zero-point+1", "int4-code+8"])
def test_the_readme_property_test_catches_bad_quantizers(quantizer):
    with pytest.raises((AssertionError, ExceptionGroup)) as info:
        _readme_property(quantizer)()
    errors = info.value.exceptions if isinstance(info.value, ExceptionGroup) else [info.value]
    assert all(isinstance(e, AssertionError) for e in errors), errors


def test_the_edge_cases_hold_an_int4_code_at_both_ends():
    from qnpu.testing import edge_cases

    int4 = [quantize(x, s).codes for x, s in edge_cases() if s.bits == 4 and s.format == "int"]
    assert any(int(c.max()) == 7 for c in int4) and any(int(c.min()) == -8 for c in int4)


def test_grid_fits_names_what_is_wrong():
    from qnpu.testing import assert_grid_fits

    x = torch.linspace(-1, 1, 16).reshape(2, 8)
    spec = QSpec(bits=4)
    q = quantize(x, spec)
    assert_grid_fits(x, q)
    with pytest.raises(AssertionError, match="never reach the end of the grid"):
        assert_grid_fits(x, quantize(x, spec, scale=q.scale * 2))
    with pytest.raises(AssertionError, match="outside the grid"):
        assert_grid_fits(x, quantize(x, spec, scale=q.scale / 2))
    asym = QSpec(bits=4, format="uint", symmetric=False)
    qa = quantize(x, asym)
    with pytest.raises(AssertionError, match="zero point off"):
        assert_grid_fits(x, quantize(x, asym, scale=qa.scale, zero_point=qa.zero_point - 1))
    assert_grid_fits(torch.zeros(2, 8), quantize(torch.zeros(2, 8), spec))  # an all-zero slice uses no code
    with pytest.raises(ValueError, match="binary"):
        assert_grid_fits(x, quantize(x, QSpec(bits=1, format="binary")))
