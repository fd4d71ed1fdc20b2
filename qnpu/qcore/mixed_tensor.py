"""`MixedTensor`: a weight whose column groups have different bit widths (SliM-LLM, Huang et al. 2024).

``W [out, in]`` in ``G = in / group_size`` groups of consecutive input columns; group ``g`` has
``group_bits[g]`` bits and one parameter pair per row:

* ``b >= 2``: integer codes of ``spec.replace(bits=b)`` (format and symmetry of ``spec``),
  ``w = (code - zero_point) * scale`` (the zero point is ``spec.symmetric_zero`` when symmetric);
* ``b = 1``: binarized, ``w = mean + scale * code`` with ``code`` in {-1, +1}.

Packed storage (`to_tensors`, byte counts exact; ``e`` = bytes per scale element, 4 for fp32;
``G1`` = binarized groups, ``Ga`` = asymmetric integer groups)::

    codes        uint8 stream     sum_g ceil(out * group_size * b_g / 8)   group g's codes, row-major,
                                                                           offset to unsigned
                                                                           (code - qmin; binary: bit =
                                                                           code > 0), b_g bits each,
                                                                           every group from a byte boundary
    group_bits   uint8 [G]        G
    scale        [out, G]         out * G * e
    zero_point   uint8 [out, Ga]  out * Ga                                 zero_point - qmin (asymmetric only)
    mean         [out, G1]        out * G1 * e                             binarized groups' offsets
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .packing import pack_bitstream, unpack_bitstream
from .spec import QSpec


@dataclass(frozen=True, eq=False)
class MixedTensor:
    """Codes ``int16 [out, in]`` (natural values: integer codes of each group's format, ±1 for
    binarized groups), ``group_bits int32 [G]``, ``scale [out, G]``, ``zero_point int32 [out, G]``
    (0 on binarized groups), ``mean [out, G]`` (0 on integer groups). ``spec``: format and symmetry
    of the integer groups (its ``bits`` is the nominal mean)."""

    codes: torch.Tensor
    group_bits: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    mean: torch.Tensor
    group_size: int
    spec: QSpec
    dtype: torch.dtype = torch.float32
    layout: ClassVar[str] = "mixed"

    def __post_init__(self) -> None:
        out, n_in = self.codes.shape
        gs = self.group_size
        if gs < 1 or n_in % gs:
            raise ValueError(f"MixedTensor: group_size={gs} does not divide in_features={n_in}")
        n_groups = n_in // gs
        if tuple(self.group_bits.shape) != (n_groups,) or not 1 <= int(self.group_bits.min()) <= int(
                self.group_bits.max()) <= 8:
            raise ValueError(f"MixedTensor: group_bits must hold {n_groups} widths in 1..8")
        for name in ("scale", "zero_point", "mean"):
            if tuple(getattr(self, name).shape) != (out, n_groups):
                raise ValueError(f"MixedTensor: {name} must have shape {(out, n_groups)}")
        if not (self.scale.is_floating_point() and self.mean.dtype == self.scale.dtype):
            raise ValueError("MixedTensor: scale and mean must be floating point of one dtype")
        if not bool(torch.isfinite(self.scale).all() and torch.isfinite(self.mean).all()):
            raise ValueError("MixedTensor: scale / mean have NaN/Inf values")
        for g, b in enumerate(self.group_bits.tolist()):
            c = self.codes[:, g * gs:(g + 1) * gs]
            zp, mu = self.zero_point[:, g], self.mean[:, g]
            if b == 1:
                ok = bool(((c == 1) | (c == -1)).all()) and not bool(zp.any())
            else:
                s = self.group_spec(b)
                zp_ok = bool((zp == s.symmetric_zero).all()) if s.symmetric else bool(
                    ((zp >= s.qmin) & (zp <= s.qmax)).all())
                ok = int(c.min()) >= s.qmin and int(c.max()) <= s.qmax and zp_ok and not bool(mu.any())
            if not ok:
                raise ValueError(f"MixedTensor: group {g} ({b} bits) has codes, zero points or means outside "
                                 "its format")

    def group_spec(self, bits: int) -> QSpec:
        """The per-row integer spec of a ``bits``-wide group (``bits >= 2``)."""
        return self.spec.replace(bits=bits, granularity="channel", axis=0, group_size=None)

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def mean_bits(self) -> float:
        return float(self.group_bits.double().mean())

    def _groups(self) -> list[tuple[int, int]]:
        return list(enumerate(self.group_bits.tolist()))

    @property
    def packed_nbytes(self) -> int:
        """Bytes of `to_tensors` (module docstring table)."""
        out = self.codes.shape[0]
        e = self.scale.element_size()
        codes = sum((out * self.group_size * b + 7) // 8 for _, b in self._groups())
        binary = sum(b == 1 for _, b in self._groups())
        asym = 0 if self.spec.symmetric else len(self._groups()) - binary
        return codes + len(self._groups()) + out * len(self._groups()) * e + out * asym + out * binary * e

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Per group: ``(code - zero_point) * scale`` or ``mean + scale * code`` (binarized), in the
        scale's precision."""
        gs = self.group_size
        blk = torch.arange(self.codes.shape[1], device=self.codes.device) // gs
        c = self.codes.to(self.scale.dtype)
        scale, zp, mu = self.scale[:, blk], self.zero_point[:, blk].to(self.scale.dtype), self.mean[:, blk]
        binary = (self.group_bits == 1)[blk]
        q = torch.where(binary, mu + scale * c, (c - zp) * scale)
        return q.to(dtype or self.dtype)

    # -- packed storage ----------------------------------------------------------------------------
    def layout_meta(self) -> dict:
        return {"group_size": self.group_size, "shape": list(self.codes.shape)}

    def to_tensors(self) -> dict[str, torch.Tensor]:
        gs = self.group_size
        streams, asym, binary = [], [], []
        for g, b in self._groups():
            c = self.codes[:, g * gs:(g + 1) * gs].to(torch.int64)
            if b == 1:
                streams.append(pack_bitstream(c > 0, 1))
                binary.append(g)
            else:
                streams.append(pack_bitstream(c - self.group_spec(b).qmin, b))
                if not self.spec.symmetric:
                    asym.append(g)
        zp = torch.stack([self.zero_point[:, g] - self.group_spec(int(self.group_bits[g])).qmin for g in asym], 1) \
            if asym else torch.zeros(self.codes.shape[0], 0, device=self.codes.device)
        return {"codes": torch.cat(streams), "group_bits": self.group_bits.to(torch.uint8),
                "scale": self.scale.contiguous(), "zero_point": zp.to(torch.uint8),
                "mean": self.mean[:, binary].contiguous()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict, spec: QSpec,
                     dtype: torch.dtype) -> "MixedTensor":
        """Rebuild from `to_tensors` / `layout_meta`; ValueError naming what is missing or mis-shaped."""
        lacking = [k for k in ("codes", "group_bits", "scale", "zero_point", "mean") if k not in tensors]
        if lacking:
            raise ValueError(f"lacks {', '.join(lacking)}")
        (out, n_in), gs = meta["shape"], meta["group_size"]
        bits = tensors["group_bits"]
        if bits.dtype != torch.uint8 or tuple(bits.shape) != (n_in // gs,):
            raise ValueError(f"group_bits must be uint8 [{n_in // gs}]")
        scale, stream = tensors["scale"], tensors["codes"]
        codes = torch.empty(out, n_in, dtype=torch.int16, device=scale.device)
        zero_point = torch.zeros(out, n_in // gs, dtype=torch.int32, device=scale.device)
        mean = torch.zeros(out, n_in // gs, dtype=scale.dtype, device=scale.device)
        start, n_asym, n_bin = 0, 0, 0
        for g, b in enumerate(bits.tolist()):
            if not 1 <= b <= 8:
                raise ValueError(f"group {g} has {b} bits; allowed: 1..8")
            size = (out * gs * b + 7) // 8
            v = unpack_bitstream(stream[start:start + size], b, out * gs).reshape(out, gs)
            start += size
            if b == 1:
                codes[:, g * gs:(g + 1) * gs] = v * 2 - 1
                mean[:, g] = tensors["mean"][:, n_bin]
                n_bin += 1
                continue
            s = spec.replace(bits=b, granularity="channel", axis=0, group_size=None)
            codes[:, g * gs:(g + 1) * gs] = v + s.qmin
            if s.symmetric:
                zero_point[:, g] = s.symmetric_zero
            else:
                zero_point[:, g] = tensors["zero_point"][:, n_asym].to(torch.int32) + s.qmin
                n_asym += 1
        if start != stream.numel():
            raise ValueError(f"codes hold {stream.numel()} bytes; the group widths need {start}")
        return cls(codes, bits.to(torch.int32), scale, zero_point, mean, gs, spec, dtype)
