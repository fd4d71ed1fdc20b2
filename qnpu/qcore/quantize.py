"""Uniform affine quantization: choose parameters, quantize, dequantize, fake-quantize.

For a spec with integer range ``[qmin, qmax]`` (see `QSpec`), per slice of elements that share
parameters (see `qnpu.qcore.layout`):

* symmetric:  ``scale = c * absmax / L``, ``zero_point = z0`` (0 for int, 2^(b-1) for uint), with
  ``L = 2^(b-1) - 1`` (or ``2^(b-1) - 1/2`` when ``full_range``) and ``c`` the clip ratio;
* asymmetric: ``lo = min(c * min, 0)``, ``hi = max(c * max, 0)``,
  ``scale = (hi - lo) / (qmax - qmin)``, ``zero_point = rint(qmin - lo / scale)``;
* binary:     ``scale = mean|x|``, ``codes = sign(x)`` with sign(0) = +1 (the L2-optimal scale
  for sign codes, Rastegari et al. 2016; used by BiLLM, Huang et al. 2024).

``codes = clamp(round(x / scale) + zero_point, qmin, qmax)`` where ``round`` is
round-half-to-even (``torch.round``, the rounding of the Ascend cast ops) or stochastic rounding
``floor(v + u)``, ``u ~ U[0, 1)`` from an explicit generator (Gupta et al. 2015). Inside the
clip range every element satisfies ``|x - dequantize(quantize(x))| <= scale / 2``. A slice of
zeros gets ``scale = 1`` (binary keeps ``alpha = 0``) so nothing divides by zero; it dequantizes to zeros.
"""
from __future__ import annotations

from typing import Literal

import torch

from .layout import check_layout, expand, qparams_shape, reduce
from .qtensor import QTensor, dequantize, zero_point_in_domain
from .spec import QSpec

Rounding = Literal["nearest", "stochastic"]
ROUNDINGS = ("nearest", "stochastic")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_finite(x: torch.Tensor, name: str = "x") -> None:
    """Raise ValueError naming ``name`` when ``x`` is not a floating tensor of finite values."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        kind = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating-point torch.Tensor; got {kind}")
    # Fast path: a finite float32 sum proves every element finite; only otherwise scan elementwise
    # (the sum may also overflow on large finite values, which the scan then clears).
    if x.numel() and bool(torch.isfinite(x.sum(dtype=torch.float32))):
        return
    if not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(f"{name} has {n_nan} NaN and {n_inf} Inf values; allowed values: finite numbers")


def choose_qparams(x: torch.Tensor, spec: QSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(scale, zero_point)`` for ``x`` under ``spec`` (absmax if symmetric, min/max otherwise).

    Both come in the natural shape of `qparams_shape`; ``zero_point`` is None when it is zero by
    construction (symmetric ``int`` and ``binary``), else an int32 tensor.
    """
    check_finite(x)
    xf = x.detach().to(_compute_dtype(x))
    c = float(spec.clip_ratio)
    if spec.format == "binary":
        return reduce(xf, spec, "absmean"), None  # no division: alpha = 0 is a valid scale here
    if spec.symmetric:
        scale = reduce(xf, spec, "absmax") * c / spec.symmetric_levels
        zero_point = None
        if spec.format == "uint":
            zero_point = torch.full(scale.shape, spec.symmetric_zero, dtype=torch.int32, device=scale.device)
    else:
        lo = torch.clamp(reduce(xf, spec, "amin") * c, max=0.0)
        hi = torch.clamp(reduce(xf, spec, "amax") * c, min=0.0)
        levels = spec.qmax - spec.qmin
        scale = (hi - lo) / levels
        # hi - lo overflows for ranges wider than the float limit: halve the range first there
        scale = torch.where(torch.isfinite(scale), scale, hi / levels - lo / levels)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        if spec.zero_point_domain == "float":
            zero_point = spec.qmin - lo / safe  # unrounded: lo lands exactly on qmin
        else:
            zero_point = torch.clamp(torch.round(spec.qmin - lo / safe), spec.qmin, spec.qmax).to(torch.int32)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    _check_grid(xf, spec, scale, zero_point)
    return scale, zero_point


def _check_grid(xf: torch.Tensor, spec: QSpec, scale: torch.Tensor, zero_point: torch.Tensor | None) -> None:
    """ValueError when values near the float limit would dequantize to +-inf: the grid point nearest
    to a slice's min or max (the extremes of ``dequantize(quantize(x))``) lies beyond the limit."""
    if bool(torch.isfinite(scale * (spec.qmax - spec.qmin)).all()):
        return  # no code is that far from the zero point: every grid point is finite
    zp = 0.0 if zero_point is None else zero_point.to(scale.dtype)
    for extreme in (reduce(xf, spec, "amin"), reduce(xf, spec, "amax")):
        codes = torch.clamp(torch.round(extreme / scale) + zp, spec.qmin, spec.qmax)
        if not bool(torch.isfinite((codes - zp) * scale).all()):
            amax = float(reduce(xf, spec, "absmax").max())
            raise ValueError(f"values up to {amax:.4g} in magnitude fall on {spec.bits}-bit {spec.format} "
                             f"grid points beyond the {xf.dtype.__str__().removeprefix('torch.')} limit "
                             f"({torch.finfo(xf.dtype).max:.4g}; they would dequantize to +-inf): scale the "
                             "tensor down, quantize it in float64, or use more bits")


def _round(v: torch.Tensor, rounding: str, generator: torch.Generator | None) -> torch.Tensor:
    if rounding == "nearest":
        return torch.round(v)
    if rounding == "stochastic":
        if generator is None:
            raise ValueError("rounding='stochastic' needs an explicit generator=torch.Generator().manual_seed(seed)")
        # drawn where the generator lives and moved: a CPU generator gives the same draws on every device
        u = torch.rand(v.shape, generator=generator, dtype=v.dtype, device=generator.device).to(v.device)
        return torch.floor(v + u)
    raise ValueError(f"rounding={rounding!r} is invalid; allowed: {' | '.join(ROUNDINGS)}")


def _code_dtype(spec: QSpec) -> torch.dtype:
    return torch.uint8 if spec.format == "uint" else torch.int8


def _given_param(p: torch.Tensor, name: str, want: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    try:
        p = torch.as_tensor(p, device=device).to(dtype).expand(want).clone()
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(torch.as_tensor(p).shape)} does not broadcast to "
                         f"the qparams shape {want}") from None
    return p


def quantize(
    x: torch.Tensor,
    spec: QSpec,
    *,
    scale: torch.Tensor | None = None,
    zero_point: torch.Tensor | None = None,
    rounding: Rounding = "nearest",
    generator: torch.Generator | None = None,
) -> QTensor:
    """Quantize ``x`` under ``spec`` to a `QTensor`; never modifies ``x``.

    ``scale`` / ``zero_point`` (broadcastable to `qparams_shape`) fix the parameters, as for a
    statically calibrated activation; otherwise `choose_qparams` computes them from ``x``.
    Stochastic rounding draws its uniforms on the ``generator``'s device and moves them to ``x``'s: a
    CPU generator gives the same codes on every device (a CUDA generator draws a different stream).
    """
    check_finite(x)
    check_layout(x.shape, spec)
    cdtype = _compute_dtype(x)
    want = qparams_shape(x.shape, spec)
    if scale is None:
        if zero_point is not None:
            raise ValueError("zero_point was given without scale; pass both or neither")
        scale, zero_point = choose_qparams(x, spec)
    else:
        scale = _given_param(scale, "scale", want, cdtype, x.device)
        lowest = 0.0 if spec.format == "binary" else torch.finfo(cdtype).tiny
        if not bool((scale >= lowest).all()) or not bool(torch.isfinite(scale).all()):
            raise ValueError(f"scale must be finite and {'>= 0' if lowest == 0 else '> 0'} everywhere")
        if zero_point is None and not spec.symmetric:
            raise ValueError("an asymmetric spec needs zero_point together with scale")
        if zero_point is None and spec.format == "uint":
            zero_point = torch.tensor(spec.symmetric_zero, device=x.device)
    if zero_point is not None:
        if spec.format == "binary":
            raise ValueError("zero_point must be None for format='binary'")
        zero_point = torch.as_tensor(zero_point, device=x.device)
        zero_point = _given_param(zero_point_in_domain(zero_point, spec, cdtype), "zero_point", want,
                                  torch.int32 if spec.zero_point_domain == "int" else cdtype, x.device)
    xf = x.detach().to(cdtype)
    if spec.format == "binary":
        codes = torch.where(xf >= 0, 1, -1).to(torch.int8)
        return QTensor(codes, scale, None, spec, x.dtype)
    v = xf / expand(scale, x.shape, spec)
    if zero_point is not None and spec.zero_point_domain == "float":
        v = _round(v + expand(zero_point, x.shape, spec), rounding, generator)  # nearest code to x/s + z
    else:
        v = _round(v, rounding, generator)
        if zero_point is not None:
            v = v + expand(zero_point, x.shape, spec)
    codes = torch.clamp(v, spec.qmin, spec.qmax).to(_code_dtype(spec))
    return QTensor(codes, scale, zero_point, spec, x.dtype)


def fake_quantize(x: torch.Tensor, spec: QSpec, **kwargs) -> torch.Tensor:
    """``dequantize(quantize(x, spec, **kwargs))`` in ``x``'s dtype (simulated quantization)."""
    return dequantize(quantize(x, spec, **kwargs), x.dtype)


def fake_quantize_ste(x: torch.Tensor, spec: QSpec, **kwargs) -> torch.Tensor:
    """`fake_quantize` whose gradient is the identity (straight-through estimator, Bengio et al. 2013).

    Forward value equals ``fake_quantize(x)``; backward passes ``d out / d x = I``.
    """
    fq = fake_quantize(x, spec, **kwargs)
    return x + (fq - x).detach()
