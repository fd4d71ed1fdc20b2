"""`QTensor`: integer codes plus the parameters that give them meaning.

``x ~= (codes - zero_point) * scale`` with ``scale`` / ``zero_point`` in the natural shape of
``qnpu.qcore.layout`` and broadcast over ``codes``. A QTensor is a frozen value and a
``torch.utils._pytree`` node (children: codes, scale, zero_point; static: spec, dtype), so
``tree_map`` over a params pytree reaches its tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree

from .layout import expand, qparams_shape
from .spec import QSpec


@dataclass(frozen=True)
class QTensor:
    """Quantized tensor. ``dtype`` is the floating dtype the codes stand for (restored by ``dequantize``)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    spec: QSpec
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.codes.is_floating_point() or self.codes.is_complex():
            raise ValueError(f"QTensor: codes must be an integer tensor; got {self.codes.dtype}")
        if not self.scale.is_floating_point():
            raise ValueError(f"QTensor: scale must be floating point; got {self.scale.dtype}")
        want = qparams_shape(self.codes.shape, self.spec)
        if tuple(self.scale.shape) != want:
            raise ValueError(f"QTensor: scale has shape {tuple(self.scale.shape)}; "
                             f"{self.spec.granularity} quantization of {tuple(self.codes.shape)} needs {want}")
        if self.zero_point is not None and tuple(self.zero_point.shape) != want:
            raise ValueError(f"QTensor: zero_point has shape {tuple(self.zero_point.shape)}; needs {want}")
        spec = self.spec
        if self.codes.numel() and not self.codes.is_meta:
            lo, hi = int(self.codes.min()), int(self.codes.max())
            if lo < spec.qmin or hi > spec.qmax:
                raise ValueError(f"QTensor: codes span [{lo}, {hi}], outside the {spec.bits}-bit {spec.format} range "
                                 f"[{spec.qmin}, {spec.qmax}] of its spec")
        if self.scale.numel() and not self.scale.is_meta and not bool(torch.isfinite(self.scale).all()):
            raise ValueError("QTensor: scale has NaN/Inf values")

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def packed_nbytes(self) -> int:
        """Bytes of a dense bit-packed encoding: codes at ``spec.bits`` each plus fp32 scales (and int8 zero points)."""
        n_params = self.scale.numel()
        zp = n_params if self.zero_point is not None else 0
        return (self.codes.numel() * self.spec.bits + 7) // 8 + 4 * n_params + zp

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``(codes - zero_point) * scale`` in ``dtype`` (default: the dtype that was quantized)."""
        return dequantize(self, dtype)


def dequantize(q: QTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Map codes back to real values: ``(codes - zero_point) * scale``, computed in the scale's precision."""
    shape = q.codes.shape
    values = q.codes.to(q.scale.dtype)
    if q.zero_point is not None:
        values = values - expand(q.zero_point, shape, q.spec).to(q.scale.dtype)
    out = values * expand(q.scale, shape, q.spec)
    return out.to(dtype or q.dtype)


def _flatten(q: QTensor):
    return [q.codes, q.scale, q.zero_point], (q.spec, q.dtype)


def _unflatten(children, context) -> QTensor:
    codes, scale, zero_point = children
    spec, dtype = context
    return QTensor(codes, scale, zero_point, spec, dtype)


pytree.register_pytree_node(QTensor, _flatten, _unflatten, serialized_type_name="qnpu.qcore.QTensor")
