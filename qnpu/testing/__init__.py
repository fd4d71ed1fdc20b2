"""qnpu.testing: hypothesis strategies and assertion helpers for quantization property tests.

Requires the ``test`` extra (``pip install "qnpu[test]"``). Paste into your own test file::

    from hypothesis import given
    from qnpu.qcore import quantize
    from qnpu.testing import (assert_codes_in_range, assert_error_within_step, assert_grid_fits,
                              quantization_cases, with_edge_cases)

    @given(quantization_cases())
    @with_edge_cases                          # fixed int4 / uint / per-token cases every profile runs
    def test_my_quantizer_is_within_half_a_step(case):
        x, spec = case
        q = quantize(x, spec)                 # swap in your own quantizer returning a QTensor
        assert_codes_in_range(q)
        assert_error_within_step(x, q)        # |x - dq(q(x))| <= scale / 2 inside the clip range
        assert_grid_fits(x, q)                # scale and zero point span x as the spec says

Call `register_profiles()` from your ``conftest.py`` to get the ``ci`` / ``dev`` / ``nightly``
profiles, then run ``pytest --hypothesis-profile=ci``.
"""
from .assertions import (
    assert_codes_in_range,
    assert_error_within_step,
    assert_grid_fits,
    assert_relative_output_error_at_most,
    assert_requantize_exact,
    assert_sqnr_at_least,
    error_bound,
)
from .blocks import block_views, random_block
from .devices import explicit_devices
from .layers import mixed_layer
from .profiles import register_profiles
from .strategies import (
    EDGE_SPECS,
    WEIGHT_KINDS,
    activations,
    edge_cases,
    qspecs,
    quantization_cases,
    shapes,
    tensors,
    weights,
    with_edge_cases,
)

__all__ = [
    "EDGE_SPECS", "WEIGHT_KINDS", "activations", "edge_cases", "with_edge_cases", "qspecs", "quantization_cases", "shapes", "tensors", "weights",
    "assert_codes_in_range", "assert_error_within_step", "assert_grid_fits", "assert_requantize_exact",
    "assert_sqnr_at_least", "assert_relative_output_error_at_most", "error_bound",
    "register_profiles", "random_block", "block_views", "mixed_layer", "explicit_devices",
]
