"""`QLinear`: a linear layer that simulates its quantized execution in PyTorch.

``y = fq_a(R x) @ W_hat^T + b`` where ``W_hat`` is the dequantized weight (the recipe's output),
``R`` the optional online Hadamard rotation (QuaRot) and ``fq_a`` fake quantization of the input
under the activation spec: per-token dynamic parameters computed from ``x`` at run time, or the
static ``(scale, zero_point)`` fixed at calibration.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qnpu.qcore import QSpec, QWeight, fake_quantize, hadamard_transform

from .capture import to_device


class QLinear(nn.Module):
    """Drop-in replacement of ``nn.Linear`` holding a fake-quantized weight and activation spec."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 qweight: QWeight | None = None, act_spec: QSpec | None = None,
                 act_qparams: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                 online_hadamard: bool = False) -> None:
        super().__init__()
        if act_spec is not None and not act_spec.dynamic and act_qparams is None:
            raise ValueError("QLinear: a static activation spec needs act_qparams=(scale, zero_point) "
                             "from calibration (see qnpu.transforms.activation_scales)")
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.qweight = qweight
        self.act_spec = act_spec
        self.act_qparams = act_qparams
        self.online_hadamard = online_hadamard
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def _apply(self, fn, recurse=True):
        # `.to(device)` / `.cuda()` move the static input qparams and the quantized weight with the
        # module (they are plain attributes, not buffers); dtype casts leave them as stored
        super()._apply(fn, recurse)
        self.act_qparams = to_device(self.act_qparams, self.weight.device)
        self.qweight = to_device(self.qweight, self.weight.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.online_hadamard:
            x = hadamard_transform(x)
        if self.act_spec is not None:
            if x.dtype != self.weight.dtype:  # under autocast: the input quantizer in the stored dtype
                x = x.to(self.weight.dtype)
            if self.act_spec.dynamic:
                x = fake_quantize(x, self.act_spec)
            else:
                scale, zero_point = self.act_qparams
                x = fake_quantize(x, self.act_spec, scale=scale, zero_point=zero_point)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        w = "float" if self.qweight is None else f"w{self.qweight.spec.bits}"
        a = "float" if self.act_spec is None else f"a{self.act_spec.bits}{'-dyn' if self.act_spec.dynamic else ''}"
        return f"in={self.in_features}, out={self.out_features}, {w}, {a}, online_hadamard={self.online_hadamard}"
