"""`BiLLMTensor`: a weight binarized by BiLLM (Huang et al. 2024), with its packed storage.

Shapes for ``W [out, in]``, ``nb = ceil(in / block_size)`` blocks of columns, ``n_s`` salient
columns. Component ``k`` of ``scale`` / ``offset`` ``[4, out, nb]`` is the per-row, per-block
``(a, mu)`` of `COMPONENTS`; the weight it stands for, per column ``j`` in block ``b = j // block_size``::

    salient j:        mu0 + a0 c + mu1 + a1 r     (c first-order sign, r second-order sign)
    non-salient j:    mu3 + a3 c if sparse else mu2 + a2 c

Packed storage (`to_tensors`, byte counts exact; ``e`` = bytes per scale element, 4 for fp32)::

    sign           uint8 stream   ceil(out * in / 8)           first-order signs, row-major, bit = c > 0
    residual_sign  uint8 stream   ceil(out * n_s / 8)          second-order signs of the salient columns
    salient        uint8 stream   ceil(in / 8)                 salient-column flags
    sparse         uint8 stream   ceil(out * (in - n_s) / 8)   sparse-group flags of the non-salient
                                                               weights (only with ``split``)
    scale          [C, out, nb]   C * out * nb * e             the components in use: salient pair
                                                               when n_s > 0, concentrated, sparse
                                                               when ``split`` (C = 1..4)
    offset         [C, out, nb]   C * out * nb * e             only with ``mean_offsets``

Streams are `qnpu.qcore.packing.pack_bitstream` at 1 bit. Unused components are zero by
construction (checked), so dropping them loses nothing and `from_tensors` is an exact inverse.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .packing import pack_bitstream, unpack_bitstream
from .spec import QSpec

COMPONENTS = ("salient", "salient_residual", "concentrated", "sparse")


def _is_sign(codes: torch.Tensor) -> bool:
    return codes.dtype == torch.int8 and bool(((codes == 1) | (codes == -1)).all())


@dataclass(frozen=True, eq=False)
class BiLLMTensor:
    """BiLLM codes, masks and per-row per-block parameters (module docstring). ``dtype``: the
    floating dtype the weight had (restored by ``dequantize``)."""

    codes: torch.Tensor
    residual_codes: torch.Tensor
    salient: torch.Tensor
    sparse: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    block_size: int
    split: bool
    mean_offsets: bool
    dtype: torch.dtype = torch.float32
    layout: ClassVar[str] = "billm"

    def __post_init__(self) -> None:
        out, n_in = self.codes.shape
        nb = -(-n_in // self.block_size)
        n_s = int(self.salient.sum())
        problems = [
            (self.salient.dtype == torch.bool and tuple(self.salient.shape) == (n_in,), f"salient must be bool [{n_in}]"),
            (self.sparse.dtype == torch.bool and tuple(self.sparse.shape) == (out, n_in),
             f"sparse must be bool [{out}, {n_in}]"),
            (_is_sign(self.codes), "codes must be int8 in {-1, +1}"),
            (tuple(self.residual_codes.shape) == (out, n_s) and _is_sign(self.residual_codes),
             f"residual_codes must be int8 in {{-1, +1}} of shape [{out}, {n_s}]"),
            (all(t.is_floating_point() and tuple(t.shape) == (4, out, nb) for t in (self.scale, self.offset)),
             f"scale and offset must be floating [4, {out}, {nb}]"),
        ]
        for ok, msg in problems:
            if not ok:
                raise ValueError(f"BiLLMTensor: {msg}")
        if bool(self.sparse[:, self.salient].any()):
            raise ValueError("BiLLMTensor: sparse flags are set on salient columns")
        if not self.split and bool(self.sparse.any()):
            raise ValueError("BiLLMTensor: sparse flags are set but split is False")
        unused = [k for k in range(4) if k not in self._components()]
        if bool(self.scale[unused].any()) or bool(self.offset[unused].any()) or (
                not self.mean_offsets and bool(self.offset.any())):
            raise ValueError("BiLLMTensor: unused components (or offsets without mean_offsets) must be zero")
        if not bool(torch.isfinite(self.scale).all() and torch.isfinite(self.offset).all()):
            raise ValueError("BiLLMTensor: scale / offset have NaN/Inf values")

    def _components(self) -> list[int]:
        return ([0, 1] if bool(self.salient.any()) else []) + [2] + ([3] if self.split else [])

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def spec(self) -> QSpec:
        """The sign format of its codes (for display; the layout is `layout`)."""
        return QSpec(bits=1, format="binary")

    @property
    def packed_nbytes(self) -> int:
        """Bytes of `to_tensors` (module docstring table)."""
        out, n_in = self.codes.shape
        n_s = int(self.salient.sum())
        streams = [out * n_in, out * n_s, n_in] + ([out * (n_in - n_s)] if self.split else [])
        params = len(self._components()) * out * self.scale.shape[2] * self.scale.element_size()
        return sum((n + 7) // 8 for n in streams) + params * (2 if self.mean_offsets else 1)

    @property
    def paper_bits_per_weight(self) -> float:
        """Sign bits per weight, the paper's headline count: ``1 + n_s / in``."""
        return 1.0 + int(self.salient.sum()) / self.codes.shape[1]

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight: ``8 * packed_nbytes / (out * in)``."""
        return 8.0 * self.packed_nbytes / self.codes.numel()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight it stands for (module docstring), computed in the scale's precision."""
        n_in = self.codes.shape[1]
        blk = torch.arange(n_in, device=self.codes.device) // self.block_size
        a, mu = self.scale[:, :, blk], self.offset[:, :, blk]
        c = self.codes.to(a.dtype)
        r = torch.zeros_like(c)
        r[:, self.salient] = self.residual_codes.to(a.dtype)
        salient_q = (mu[0] + a[0] * c) + (mu[1] + a[1] * r)
        other_q = torch.where(self.sparse, mu[3] + a[3] * c, mu[2] + a[2] * c)
        q = torch.where(self.salient.unsqueeze(0), salient_q, other_q)
        return q.to(dtype or self.dtype)

    # -- packed storage ----------------------------------------------------------------------------
    def layout_meta(self) -> dict:
        return {"block_size": self.block_size, "split": self.split, "mean_offsets": self.mean_offsets,
                "shape": list(self.codes.shape)}

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The packed tensors by suffix (module docstring); `from_tensors` inverts it exactly."""
        keep = self._components()
        t = {"sign": pack_bitstream(self.codes > 0, 1), "residual_sign": pack_bitstream(self.residual_codes > 0, 1),
             "salient": pack_bitstream(self.salient, 1), "scale": self.scale[keep].contiguous()}
        if self.split:
            t["sparse"] = pack_bitstream(self.sparse[:, ~self.salient], 1)
        if self.mean_offsets:
            t["offset"] = self.offset[keep].contiguous()
        return t

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict, spec: QSpec | None,
                     dtype: torch.dtype) -> "BiLLMTensor":
        """Rebuild from `to_tensors` / `layout_meta` (``spec`` is not used: the codes are signs);
        ValueError naming what is missing or mis-shaped."""
        out, n_in = meta["shape"]
        block_size, split, offsets = meta["block_size"], meta["split"], meta["mean_offsets"]
        need = ["sign", "residual_sign", "salient", "scale"] + (["sparse"] if split else []) + (
            ["offset"] if offsets else [])
        lacking = [k for k in need if k not in tensors]
        if lacking:
            raise ValueError(f"lacks {', '.join(lacking)}")
        salient = unpack_bitstream(tensors["salient"], 1, n_in).bool()
        n_s = int(salient.sum())

        def signs(key: str, rows: int, cols: int) -> torch.Tensor:
            return (unpack_bitstream(tensors[key], 1, rows * cols).reshape(rows, cols) * 2 - 1).to(torch.int8)

        sparse = torch.zeros(out, n_in, dtype=torch.bool, device=salient.device)
        if split:
            sparse[:, ~salient] = unpack_bitstream(tensors["sparse"], 1, out * (n_in - n_s)).reshape(
                out, n_in - n_s).bool()
        keep = ([0, 1] if n_s else []) + [2] + ([3] if split else [])
        nb = -(-n_in // block_size)
        full = []
        for key in ("scale", "offset"):
            stored = tensors.get(key)
            ref = tensors["scale"]
            if stored is not None and tuple(stored.shape) != (len(keep), out, nb):
                raise ValueError(f"{key} has shape {tuple(stored.shape)}; needs {(len(keep), out, nb)}")
            p = torch.zeros(4, out, nb, dtype=ref.dtype, device=ref.device)
            if stored is not None:
                p[keep] = stored
            full.append(p)
        return cls(signs("sign", out, n_in), signs("residual_sign", out, n_s), salient, sparse, full[0], full[1],
                   block_size, split, offsets, dtype)
