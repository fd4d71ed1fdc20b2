"""Assertion helpers that state the algebra of quantization, with readable failure messages."""
from __future__ import annotations

import math

import torch

from qnpu.qcore import QTensor, dequantize, quantize, relative_output_error, sqnr_db
from qnpu.qcore.layout import expand, reduce


def _where(mask: torch.Tensor) -> str:
    idx = tuple(int(i) for i in torch.nonzero(mask)[0])
    return f"{int(mask.sum())} element(s), first at index {idx}"


def assert_codes_in_range(q: QTensor) -> None:
    """Every code lies in ``[spec.qmin, spec.qmax]`` (binary: in {-1, +1})."""
    codes = q.codes.to(torch.int64)
    if q.spec.format == "binary":
        bad = (codes != 1) & (codes != -1)
    else:
        bad = (codes < q.spec.qmin) | (codes > q.spec.qmax)
    assert not bool(bad.any()), (
        f"codes outside [{q.spec.qmin}, {q.spec.qmax}]: {_where(bad)}; spec={q.spec}")


def error_bound(x: torch.Tensor, q: QTensor, *, step_fraction: float = 0.5) -> torch.Tensor:
    """Per-element bound on ``|x - dequantize(q)|`` for uniform (non-binary) quantization.

    Inside the representable range ``[(qmin - z) s, (qmax - z) s]`` the error is at most
    ``step_fraction * s`` (1/2 for round-to-nearest, 1 for stochastic rounding); a clipped
    element may in addition be off by its distance to that range.
    """
    if q.spec.format == "binary":
        raise ValueError("error_bound applies to uniform formats; binary codes have no step bound")
    s = expand(q.scale, x.shape, q.spec).double()
    z = 0 if q.zero_point is None else expand(q.zero_point, x.shape, q.spec).double()
    lo, hi = (q.spec.qmin - z) * s, (q.spec.qmax - z) * s
    xd = x.double()
    outside = torch.clamp(lo - xd, min=0) + torch.clamp(xd - hi, min=0)
    return step_fraction * s + outside


def assert_error_within_step(x: torch.Tensor, q: QTensor, *, step_fraction: float = 0.5,
                             rtol: float | None = None) -> None:
    """``|x - dequantize(q)| <= error_bound(x, q)`` up to float rounding of ``x / scale``.

    ``rtol`` defaults to a few ulps of the compute precision, relative to ``|x| + scale``.
    """
    xd = x.double()
    err = (xd - dequantize(q, torch.float64)).abs()
    if rtol is None:
        rtol = 8 * torch.finfo(q.scale.dtype).eps
    s = expand(q.scale, x.shape, q.spec).double()
    bound = error_bound(x, q, step_fraction=step_fraction) + rtol * (xd.abs() + s)
    bad = err > bound
    assert not bool(bad.any()), (
        f"quantization error above {step_fraction} x scale: {_where(bad)}; "
        f"max excess {float((err - bound).max()):.3e}; spec={q.spec}")


def assert_requantize_exact(q: QTensor) -> None:
    """Quantizing ``dequantize(q)`` with ``q``'s own parameters gives back exactly ``q.codes``."""
    again = quantize(dequantize(q, q.scale.dtype), q.spec, scale=q.scale, zero_point=q.zero_point)
    bad = again.codes != q.codes
    assert not bool(bad.any()), f"quantize(dequantize(q)) changed codes: {_where(bad)}; spec={q.spec}"


def assert_sqnr_at_least(x: torch.Tensor, x_hat: torch.Tensor, db: float) -> None:
    """SQNR of ``x_hat`` against ``x`` is at least ``db`` decibels."""
    got = sqnr_db(x, x_hat)
    assert got >= db, f"SQNR {got:.2f} dB < required {db:.2f} dB"


def assert_relative_output_error_at_most(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor,
                                         bound: float) -> None:
    """``||X W^T - X W_hat^T|| / ||X W^T|| <= bound``."""
    got = relative_output_error(x, w, w_hat)
    assert got <= bound, f"relative output error {got:.4g} > bound {bound:.4g}"


def assert_grid_fits(x: torch.Tensor, q: QTensor, *, rtol: float | None = None) -> None:
    """The grid spans each slice the way ``q.spec`` says (absmax if symmetric, min/max otherwise, both
    times ``clip_ratio``), which `assert_error_within_step` cannot see (it allows clipping, and a
    scale 2x too large still keeps the error within half of its own step):

    * covers: every ``clip_ratio * x`` lies within half a step of the representable range
      ``[(qmin - z) s, (qmax - z) s]``; a scale too small, or a zero point that shifts the range,
      clips values the spec keeps;
    * tight: every slice that is not all zeros reaches the end of its grid (symmetric:
      ``max |code - z| >= floor(levels)``, see `QSpec.symmetric_levels`; asymmetric: a code at
      ``qmin`` or ``qmax``); a scale larger than the slice needs leaves codes unused.

    For a quantizer that chooses its own clipping (MSE or percentile scale search) use
    `assert_error_within_step` alone. Binary specs have no uniform grid (ValueError).
    """
    spec = q.spec
    if spec.format == "binary":
        raise ValueError("assert_grid_fits applies to uniform formats; binary codes have no grid")
    s = expand(q.scale, x.shape, spec).double()
    z = torch.zeros_like(s) if q.zero_point is None else expand(q.zero_point, x.shape, spec).double()
    y = x.double() * float(spec.clip_ratio)
    if rtol is None:
        rtol = 8 * torch.finfo(q.scale.dtype).eps
    outside = torch.clamp((spec.qmin - z) * s - y, min=0) + torch.clamp(y - (spec.qmax - z) * s, min=0)
    bad = outside > 0.5 * s + rtol * (y.abs() + s)
    assert not bool(bad.any()), (
        f"values the spec keeps fall more than half a step outside the grid (scale too small or zero point "
        f"off): {_where(bad)}; max {float((outside / s).max()):.3g} steps outside; spec={spec}")
    codes = q.codes.double()
    used = reduce(x.double(), spec, "absmax") > 0
    if spec.symmetric:
        reach = reduce(codes - z, spec, "absmax") >= math.floor(spec.symmetric_levels)
    else:
        reach = (reduce(codes, spec, "amax") >= spec.qmax) | (reduce(codes, spec, "amin") <= spec.qmin)
    short = used & ~reach
    assert not bool(short.any()), (
        f"slices whose codes never reach the end of the grid (scale too large): {_where(short)} of the "
        f"scale's {tuple(short.shape)}; spec={spec}")
