import math

import pytest
import torch

from qnpu.qcore import max_abs_error, mse, relative_output_error, sqnr_db


def test_metric_values():
    x = torch.tensor([3.0, 4.0])
    y = torch.tensor([3.0, 3.0])
    assert mse(x, y) == pytest.approx(0.5)
    assert max_abs_error(x, y) == pytest.approx(1.0)
    assert sqnr_db(x, y) == pytest.approx(10 * math.log10(25.0))
    assert sqnr_db(x, x) == math.inf
    assert sqnr_db(torch.zeros(2), y) == -math.inf


def test_relative_output_error():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(16, 8, generator=g), torch.randn(4, 8, generator=g)
    assert relative_output_error(x, w, w) == 0.0
    assert relative_output_error(x, w, 1.5 * w) == pytest.approx(0.5)
    assert relative_output_error(x, w, torch.zeros_like(w)) == pytest.approx(1.0)
    assert relative_output_error(torch.zeros(2, 8), w, 2 * w) == 0.0


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="shapes differ"):
        mse(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="input features"):
        relative_output_error(torch.zeros(2, 3), torch.zeros(4, 8), torch.zeros(4, 8))
