"""Lowered linears: one ``nn.Module`` per scheme, calling only ``torch.ops.qnpu`` ops.

Every module holds its weight already laid out as its op wants (``(K, N)`` int8, or int32 with
eight int4 per word), scales in the encoding the serving stack uses for the model's dtype, and
runs ``y = op(x)`` on a 2-d view of the input. The same module runs the reference kernels on
CPU/CUDA tensors and torch_npu's kernels on NPU tensors (docs/architecture.md, "Lowering").
"""
from __future__ import annotations

import torch
from torch import nn

from qnpu.qcore import hadamard_transform

ops = torch.ops.qnpu


class LoweredLinear(nn.Module):
    """Common part: label, shapes, the model dtype and the optional online Hadamard (reference only)."""

    scheme = ""

    def __init__(self, label: str, in_features: int, out_features: int, dtype: torch.dtype,
                 online_hadamard: bool = False) -> None:
        super().__init__()
        self.label, self.in_features, self.out_features = label, in_features, out_features
        self.dtype, self.online_hadamard = dtype, online_hadamard

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.dtype)
        if self.online_hadamard:
            x2 = hadamard_transform(x2)
        return self.matmul(x2).reshape(*lead, self.out_features)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"{self.label}: {self.scheme}, in={self.in_features}, out={self.out_features}, {self.dtype}"
                + (", online_hadamard" if self.online_hadamard else ""))


class W8A8StaticLinear(LoweredLinear):
    """W8A8 static: ``npu_quantize(x, 1/input_scale, input_offset)`` -> ``npu_quant_matmul`` with an int32
    bias and the deq scale ``input_scale * weight_scale`` (msModelSlim / vllm-ascend W8A8)."""

    scheme = "W8A8"

    def __init__(self, *, weight, input_scale_recip, input_offset, quant_bias, deq_scale, **kw) -> None:
        super().__init__(**kw)
        for name, t in dict(weight=weight, input_scale_recip=input_scale_recip, input_offset=input_offset,
                            quant_bias=quant_bias, deq_scale=deq_scale).items():
            self.register_buffer(name, t)

    def matmul(self, x):
        xq = ops.npu_quantize(x, self.input_scale_recip, self.input_offset, torch.qint8, -1, False)
        return ops.npu_quant_matmul(xq, self.weight, self.deq_scale, bias=self.quant_bias, output_dtype=self.dtype)


class W8A8DynamicLinear(LoweredLinear):
    """W8A8 dynamic: ``npu_dynamic_quant`` -> ``npu_quant_matmul(..., pertoken_scale)`` with the
    per-channel weight scale and a float bias. Also W4A8 where A8W4 does not apply (int4 codes
    widened to int8, the prologue of CATLASS ``32_w4a8_matmul``)."""

    scheme = "W8A8_DYNAMIC"

    def __init__(self, *, weight, weight_scale, bias, scheme=None, **kw) -> None:
        super().__init__(**kw)
        if scheme:
            self.scheme = scheme
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("bias", bias)

    def matmul(self, x):
        xq, tok = ops.npu_dynamic_quant(x)
        return ops.npu_quant_matmul(xq, self.weight, self.weight_scale, pertoken_scale=tok, bias=self.bias,
                                    output_dtype=self.dtype)


class WeightOnlyLinear(LoweredLinear):
    """W8A16 / W4A16: ``npu_weight_quant_batchmatmul`` with per-channel or per-group antiquant params."""

    def __init__(self, *, weight, antiquant_scale, antiquant_offset, bias, group_size, scheme, **kw) -> None:
        super().__init__(**kw)
        self.scheme, self.group_size = scheme, group_size
        self.register_buffer("weight", weight)
        self.register_buffer("antiquant_scale", antiquant_scale)
        self.register_buffer("antiquant_offset", antiquant_offset)
        self.register_buffer("bias", bias)

    def matmul(self, x):
        return ops.npu_weight_quant_batchmatmul(x, self.weight, self.antiquant_scale, self.antiquant_offset,
                                                bias=self.bias, antiquant_group_size=self.group_size)


class W4A8Linear(LoweredLinear):
    """W4A8 dynamic on the A8W4 matmul: ``npu_dynamic_quant`` -> ``npu_quant_matmul`` with int32-packed
    int4 weight, int64 per-256-group scale and ``offset`` = yOffset; a float bias is added after."""

    scheme = "W4A8_DYNAMIC"

    def __init__(self, *, weight, scale, y_offset, bias, **kw) -> None:
        super().__init__(**kw)
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.register_buffer("y_offset", y_offset)
        self.register_buffer("bias", bias)

    def matmul(self, x):
        xq, tok = ops.npu_dynamic_quant(x)
        y = ops.npu_quant_matmul(xq, self.weight, self.scale, offset=self.y_offset, pertoken_scale=tok.unsqueeze(-1),
                                 output_dtype=self.dtype)
        return y if self.bias is None else (y.to(torch.float32) + self.bias).to(self.dtype)


class W4A8MatmulLinear(LoweredLinear):
    """Dense W4A8 on ``qnpu::w4a8_matmul`` (the CATLASS kernel's op): ``npu_dynamic_quant`` -> int4
    weight ``(K, N/8)`` with fp32 scales per channel ``(N,)`` or per group ``(K/g, N)``, any group
    that is a multiple of 32; the float bias goes to the op."""

    scheme = "W4A8_DYNAMIC"

    def __init__(self, *, weight, scale, bias, group_size, **kw) -> None:
        super().__init__(**kw)
        self.group_size = group_size
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)

    def matmul(self, x):
        xq, tok = ops.npu_dynamic_quant(x)
        return ops.w4a8_matmul(xq, self.weight, self.scale, tok, bias=self.bias, group_size=self.group_size,
                               output_dtype=self.dtype)
