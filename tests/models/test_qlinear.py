import pytest
import torch
import torch.nn.functional as F

from qnpu.qcore import QSpec, fake_quantize, hadamard_transform
from qnpu.models.qlinear import QLinear

A8D = QSpec(bits=8, granularity="token", dynamic=True)
A8S = QSpec(bits=8, granularity="tensor")


def test_dynamic_activation_fake_quant_and_online_hadamard():
    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(6, 16, generator=g), torch.randn(6, generator=g), torch.randn(2, 3, 16, generator=g)
    layer = QLinear(w, b, act_spec=A8D, online_hadamard=True)
    expected = F.linear(fake_quantize(hadamard_transform(x), A8D), w, b)
    assert torch.equal(layer(x), expected)
    assert not torch.equal(layer(x), F.linear(x, w, b))


def test_static_activation_uses_the_calibrated_scale():
    w, x = torch.eye(4), torch.tensor([[0.3, -2.0, 0.05, 1.0]])
    layer = QLinear(w, act_spec=A8S, act_qparams=(torch.tensor(0.01), None))
    # -2.0 saturates at the int8 minimum, -128 * 0.01 (as the NPU's saturating cast)
    assert torch.allclose(layer(x), torch.tensor([[0.30, -1.28, 0.05, 1.0]]))


def test_static_activation_without_qparams_is_refused():
    with pytest.raises(ValueError, match="act_qparams"):
        QLinear(torch.eye(4), act_spec=A8S)
