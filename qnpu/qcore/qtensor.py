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
        if self.zero_point is not None:
            object.__setattr__(self, "zero_point", zero_point_in_domain(self.zero_point, self.spec, self.scale.dtype,
                                                                         "QTensor: zero_point"))
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
        """Bytes of a dense bit-packed encoding: the codes at ``spec.bits`` bits each, rounded up to whole
        bytes, plus the scales in their dtype, plus the zero points (``"int"`` domain: one byte each,
        as they lie in ``[qmin, qmax]`` of at most 8 bits; ``"float"``: in their dtype)."""
        codes = (self.codes.numel() * self.spec.bits + 7) // 8
        scales = self.scale.numel() * self.scale.element_size()
        if self.zero_point is None:
            return codes + scales
        per = 1 if self.spec.zero_point_domain == "int" else self.zero_point.element_size()
        return codes + scales + self.zero_point.numel() * per

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``(codes - zero_point) * scale`` in ``dtype`` (default: the dtype that was quantized)."""
        return dequantize(self, dtype)


def zero_point_in_domain(zp: torch.Tensor, spec: QSpec, float_dtype: torch.dtype = torch.float32,
                         name: str = "zero_point") -> torch.Tensor:
    """``zp`` as ``spec.zero_point_domain`` stores it: int32 for ``"int"`` (a floating ``zp`` only when
    every value is a whole number: a fraction would be truncated, so it raises ValueError naming
    ``name``), ``float_dtype`` for ``"float"`` (finite values only)."""
    zp = torch.as_tensor(zp)
    if spec.zero_point_domain == "float":
        zp = zp.to(float_dtype)
        if zp.numel() and not zp.is_meta and not bool(torch.isfinite(zp).all()):
            raise ValueError(f"{name} has NaN/Inf values")
        return zp
    if zp.is_floating_point():
        if zp.numel() and not zp.is_meta and not bool((torch.isfinite(zp) & (zp == torch.round(zp))).all()):
            bad = zp[~(torch.isfinite(zp) & (zp == torch.round(zp)))]
            raise ValueError(f"{name} holds {bad.numel()} value(s) that are not whole numbers (first "
                             f"{float(bad.flatten()[0])!r}) but the spec's zero_point_domain is 'int': converting "
                             "would truncate them; round them explicitly or use zero_point_domain='float'")
        return zp.to(torch.int32)
    if zp.is_complex() or zp.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer or float tensor; got {zp.dtype}")
    return zp


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
