"""qnpu.testing: hypothesis strategies and assertion helpers for quantization property tests.

Requires the ``test`` extra (``pip install "qnpu[test]"``). Paste into your own test file::

    from hypothesis import given
    from qnpu.qcore import quantize
    from qnpu.testing import assert_codes_in_range, assert_error_within_step, quantization_cases

    @given(quantization_cases())
    def test_my_quantizer_is_within_half_a_step(case):
        x, spec = case
        q = quantize(x, spec)                 # swap in your own quantizer returning a QTensor
        assert_codes_in_range(q)
        assert_error_within_step(x, q)        # |x - dq(q(x))| <= scale / 2 inside the clip range

Call `register_profiles()` from your ``conftest.py`` to get the ``ci`` / ``dev`` / ``nightly``
profiles, then run ``pytest --hypothesis-profile=ci``.
"""
from .assertions import (
    assert_codes_in_range,
    assert_error_within_step,
    assert_relative_output_error_at_most,
    assert_requantize_exact,
    assert_sqnr_at_least,
    error_bound,
)
from .blocks import block_views, random_block
from .layers import mixed_layer
from .profiles import register_profiles
from .strategies import WEIGHT_KINDS, activations, qspecs, quantization_cases, shapes, tensors, weights

__all__ = [
    "WEIGHT_KINDS", "activations", "qspecs", "quantization_cases", "shapes", "tensors", "weights",
    "assert_codes_in_range", "assert_error_within_step", "assert_requantize_exact",
    "assert_sqnr_at_least", "assert_relative_output_error_at_most", "error_bound",
    "register_profiles", "random_block", "block_views", "mixed_layer",
]
