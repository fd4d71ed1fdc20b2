"""Quantization specs: the numeric format and granularity of one quantized tensor.

A `QSpec` is a frozen, keyword-only value validated at construction. Variants are made with
`dataclasses.replace` (which re-runs validation), never by mutation.

Formats
    ``"int"``     signed two's-complement codes in ``[-2^(b-1), 2^(b-1) - 1]``.
    ``"uint"``    unsigned codes in ``[0, 2^b - 1]``.
    ``"binary"``  codes in ``{-1, +1}`` (``bits`` must be 1), the sign format of BiLLM
                  (Huang et al. 2024) with one scale ``alpha = mean|x|`` per slice.

Granularities (which elements share one scale / zero point)
    ``"tensor"``   one pair for the whole tensor.
    ``"channel"``  one pair per index of ``axis`` (``axis=0`` is the output channel of an
                   ``[out, in]`` weight).
    ``"group"``    one pair per run of ``group_size`` consecutive elements along ``axis``
                   (``axis=-1`` is the input dimension of an ``[out, in]`` weight).
    ``"token"``    one pair per row of the last dimension (all leading indices), computed at
                   run time: always ``dynamic``.

Symmetric specs fix the zero point (0 for ``int``, ``2^(b-1)`` for ``uint``) and take the scale
from ``absmax``; asymmetric specs take scale and an integer zero point from ``min``/``max``.
``full_range=False`` (default, what the Ascend int8 ops use: ``scale = amax / 127``) maps
``absmax`` to ``2^(b-1) - 1``; ``full_range=True`` maps it to ``2^(b-1) - 1/2`` so that the
most negative code is used too (GPTQ-style symmetric grids).

Zero-point domain (``zero_point_domain``, asymmetric specs only)
    ``"int"``    (default) an integer zero point in ``[qmin, qmax]``: ``x ~= (q - z) s`` with ``z``
                 an integer, as in int8/uint8 kernels and compressed-tensors; a float zero point
                 with a fraction is refused, never truncated.
    ``"float"``  a floating zero point, kept unrounded: ``z = qmin - lo / s`` maps ``lo`` exactly
                 onto ``qmin``. Ascend's weight-only matmul takes its offset this way
                 (``npu_weight_quant_batchmatmul``: ``w = (q + antiquant_offset) * antiquant_scale``
                 with ``antiquant_offset = -z`` in the activation dtype; torch_npu 2.13.0 docs).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

FORMATS = ("int", "uint", "binary")
GRANULARITIES = ("tensor", "channel", "group", "token")
ZERO_POINT_DOMAINS = ("int", "float")

Format = Literal["int", "uint", "binary"]
Granularity = Literal["tensor", "channel", "group", "token"]


def _fail(name: str, value, allowed: str) -> None:
    raise ValueError(f"QSpec: {name}={value!r} is invalid; allowed: {allowed}")


@dataclass(frozen=True, kw_only=True)
class QSpec:
    """How to quantize one tensor (see the module docstring for the meaning of each field).

    Example: per-channel symmetric int8 weights ``QSpec(bits=8)``; W4 groups of 64
    ``QSpec(bits=4, granularity="group", group_size=64)``; per-token dynamic int8
    activations ``QSpec(bits=8, granularity="token", dynamic=True)``.
    """

    bits: int = 8
    format: Format = "int"
    symmetric: bool = True
    granularity: Granularity = "channel"
    axis: int = 0
    group_size: int | None = None
    dynamic: bool = False
    clip_ratio: float = 1.0
    full_range: bool = False
    zero_point_domain: Literal["int", "float"] = "int"

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            _fail("bits", self.bits, "an int in 1..8")
        if self.format not in FORMATS:
            _fail("format", self.format, " | ".join(FORMATS))
        if self.granularity not in GRANULARITIES:
            _fail("granularity", self.granularity, " | ".join(GRANULARITIES))
        for name in ("symmetric", "dynamic", "full_range"):  # "false" from a recipe file would read as true
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "True | False")
        if not isinstance(self.axis, int) or isinstance(self.axis, bool):
            _fail("axis", self.axis, "an int (negative counts from the end)")
        if self.granularity == "group":
            gs = self.group_size
            if isinstance(gs, bool) or not isinstance(gs, int) or gs <= 0:
                _fail("group_size", gs, "an int > 0 when granularity='group'")
        elif self.group_size is not None:
            _fail("group_size", self.group_size, "None unless granularity='group'")
        if self.granularity == "token" and not self.dynamic:
            _fail("dynamic", self.dynamic, "True when granularity='token' (per-token scales are computed at run time)")
        ratio = self.clip_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
            _fail("clip_ratio", ratio, "a number in (0, 1]")
        if self.format == "binary":
            if self.bits != 1:
                _fail("bits", self.bits, "1 when format='binary'")
            if not self.symmetric:
                _fail("symmetric", self.symmetric, "True when format='binary' (codes are {-1, +1})")
            if self.full_range:
                _fail("full_range", self.full_range, "False when format='binary'")
        elif self.symmetric and self.bits == 1:
            _fail("bits", 1, "2..8 for a symmetric int/uint format (a 1-bit grid has no code on each "
                  "side of zero); use format='binary' or symmetric=False")
        if self.full_range and not self.symmetric:
            _fail("full_range", True, "False when symmetric=False (asymmetric grids already use every code)")
        if self.zero_point_domain not in ZERO_POINT_DOMAINS:
            _fail("zero_point_domain", self.zero_point_domain, " | ".join(ZERO_POINT_DOMAINS))
        if self.zero_point_domain == "float" and self.symmetric:
            _fail("zero_point_domain", "float", "'int' when symmetric=True (the zero point is fixed: 0, or 2^(b-1) "
                  "for uint)")

    # -- derived integer range -------------------------------------------------------------
    @property
    def qmin(self) -> int:
        """Smallest code of the format."""
        if self.format == "binary":
            return -1
        return -(1 << (self.bits - 1)) if self.format == "int" else 0

    @property
    def qmax(self) -> int:
        """Largest code of the format."""
        if self.format == "binary":
            return 1
        return (1 << (self.bits - 1)) - 1 if self.format == "int" else (1 << self.bits) - 1

    @property
    def symmetric_zero(self) -> int:
        """The fixed zero point of a symmetric spec: 0 for int, 2^(b-1) for uint."""
        return 0 if self.format in ("int", "binary") else 1 << (self.bits - 1)

    @property
    def symmetric_levels(self) -> float:
        """Codes between the zero point and ``absmax`` in a symmetric grid."""
        half = (self.qmax - self.qmin) / 2
        return half if self.full_range else float(self.qmax - self.symmetric_zero)

    def replace(self, **changes) -> "QSpec":
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain-dict form (JSON/YAML friendly); ``QSpec.from_dict`` is its exact inverse. The default
        ``zero_point_domain="int"`` is left out, so files written before the field existed read the same."""
        out = dataclasses.asdict(self)
        if out["zero_point_domain"] == "int":
            del out["zero_point_domain"]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "QSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"QSpec.from_dict: unknown keys {unknown}; allowed: {sorted(known)}")
        return cls(**data)
