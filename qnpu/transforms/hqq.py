"""HQQ: zero points by half-quadratic splitting, with the scale fixed and no calibration data.

Half-Quadratic Quantization (Badri & Shaji 2023, "Half-Quadratic Quantization of Large Machine
Learning Models") chooses, per slice (group, channel or tensor) of a weight ``W``, the zero point
``z`` that minimizes the lp "norm" (``p < 1``, sparsity-promoting: a few large errors cost less
than many small ones) of the dequantization error, the scale ``s`` staying fixed::

    min_z  sum_k |W_k - s (Q(W_k; s, z) - z)|^p,     Q(W; s, z) = clamp(round(W / s + z), qmin, qmax)

Splitting the error into an auxiliary ``W_e`` with a quadratic coupling of weight ``beta`` gives
alternating closed-form steps, from the zero point of round-to-nearest::

    W_q = Q(W; s, z)                        codes with the current zero point
    W_r = s (W_q - z)                       dequantized weight
    W_e = shrink_p(W - W_r; beta)           shrink_p(x) = sign(x) relu(|x| - |x|^(p-1) / beta)
    z   = mean_slice(W_q - (W - W_e) / s)   the zero point that best explains W - W_e
    beta = kappa beta

``shrink_p`` is the paper's generalized soft threshold (``p = 1``: soft thresholding at ``1 / beta``;
an error is kept as an outlier when ``|x| > beta^(-1 / (2 - p))``). Its threshold is in the
weight's own units, as in the paper: on weights of magnitude ~0.02 and ``beta = 10`` hardly any
error passes it, and the step reduces to the least-squares zero point of the current codes.

Conventions. qnpu dequantizes ``W ~= (q - z) s`` (`qnpu.qcore.dequantize`), the paper's
``s (W_q - z)`` with ``W_q = round(W / s + z)``; implementations that keep ``1 / s`` instead
multiply where this divides. ``z`` is unrounded: the spec's ``zero_point_domain`` must be
``"float"``, Ascend's floating ``antiquant_offset = -z`` (docs/architecture.md, "Zero-point domain").

Differences from the paper's loop, each a guarantee rather than a change of method: every iterate
is scored on the lp objective of the codes it gives, and each slice keeps the best zero point it
has seen, starting with RTN's, so no slice ends worse than RTN with the same scale; the loop stops
when a step improves no slice, i.e. when the error of the result stops improving. The paper's
loop stops when the mean absolute error of the current iterate stops improving; on the default
model's weights (uint4, groups of 64) the first step raises the total while it lowers the error of
a third of the groups, so that rule stops there (docs/architecture.md, "HQQ zero points").

`hqq` is a zero-point search: it sets ``LinearSpec.weight_qparams`` and a later rounder (`rtn`)
writes the codes. It reads nothing but the weights, so recipes built from it take the engine's
data-free path.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from qnpu.qcore import QSpec, choose_qparams
from qnpu.qcore.layout import qparams_shape

from .base import QTransform, register_state, register_transform
from .checks import check_int, check_range
from .rounder import checked_weight, quantizable
from .scale_search import as_slices, compute_dtype
from .view import BlockView, fail


@register_state
class HQQState(NamedTuple):
    """Per linear (names relative to the block).

    qparams:    ``name -> (scale, zero_point)``, natural shape; the zero points are floats.
    errors:     ``name -> (rtn, hqq)``: the lp error summed over the weight, at RTN's zero points and
                at the chosen ones.
    iterations: ``name -> `` splitting steps run before the stop.
    """

    qparams: dict
    errors: dict
    iterations: dict


def shrink_lp(x: torch.Tensor, beta: float, norm: float) -> torch.Tensor:
    """``sign(x) relu(|x| - |x|^(norm-1) / beta)``: the generalized soft-thresholding step of
    Badri & Shaji 2023 for the lp penalty with ``p = norm``; soft thresholding when ``p = 1``.
    A zero stays zero (``0^(p-1) = inf`` for ``p < 1`` gives ``relu(-inf) = 0``)."""
    a = x.abs()
    return torch.sign(x) * torch.relu(a - a.pow(norm - 1.0) / beta)


def zero_point_step(w: torch.Tensor, codes: torch.Tensor, outliers: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The zero-point sub-problem of Badri & Shaji 2023: with codes and outliers ``W_e`` fixed,
    ``argmin_z sum_k ((W_k - W_e,k) - s (W_q,k - z))^2 = mean_k(W_q,k - (W_k - W_e,k) / s)`` per row
    of the slices ``w, codes, outliers [S, k]``, ``scale [S, 1]``; returns ``[S, 1]``."""
    return torch.mean(codes - (w - outliers) / scale, dim=-1, keepdim=True)


def _slice_lp(d: torch.Tensor, norm: float) -> torch.Tensor:
    """``sum_k |d_k|^norm`` of each row of ``d [S, k]``, in float64."""
    return d.double().abs().pow(norm).sum(-1)


def lp_errors(w: torch.Tensor, w_hat: torch.Tensor, spec: QSpec, norm: float = 0.7) -> torch.Tensor:
    """HQQ's objective per slice of ``spec``: ``sum_k |w_k - w_hat_k|^norm`` (float64, ``[S]`` in the
    row-major order of the natural qparams shape)."""
    return _slice_lp(as_slices(w - w_hat, spec), norm)


def hqq_zero_points(w: torch.Tensor, spec: QSpec, scale: torch.Tensor, zero_point: torch.Tensor, *,
                    norm: float = 0.7, beta: float = 10.0, kappa: float = 1.01, iters: int = 20
                    ) -> tuple[torch.Tensor, float, float, int]:
    """The module docstring's iteration on ``w [out, in]`` from ``(scale, zero_point)`` (natural
    shape, e.g. `choose_qparams`). Codes and dequantized values are computed with the arithmetic of
    `qnpu.qcore.quantize` / `dequantize` in ``w``'s compute precision, so the errors scored here are
    those of the QTensor a rounder then writes. Returns ``(zero_point, rtn_error, hqq_error,
    iterations)``: float zero points in the natural shape, the lp errors summed over ``w`` at the
    start and at the result, and the number of steps run."""
    dtype = compute_dtype(w)
    shape = qparams_shape(w.shape, spec)
    wf = as_slices(w.detach().to(dtype), spec)
    s = scale.to(dtype).expand(shape).reshape(-1, 1)
    z = zero_point.to(dtype).expand(shape).reshape(-1, 1)

    def score(z: torch.Tensor):
        codes = torch.clamp(torch.round(wf / s + z), spec.qmin, spec.qmax)
        dq = (codes - z) * s
        return codes, dq, _slice_lp(wf - dq, norm)

    codes, dq, best = score(z)
    start, best_z, lowest, steps = best, z, float(best.sum()), 0
    for _ in range(iters):
        outliers = shrink_lp(wf - dq, beta, norm)
        z = zero_point_step(wf, codes, outliers, s)
        beta *= kappa
        codes, dq, err = score(z)
        steps += 1
        better = err < best
        best_z, best = torch.where(better.unsqueeze(-1), z, best_z), torch.where(better, err, best)
        total = float(best.sum())
        if not total < lowest:  # no slice improved: the result stopped improving
            break
        lowest = total
    return best_z.reshape(shape), float(start.sum()), float(best.sum()), steps


@register_transform("hqq", reads=())
def hqq(norm: float = 0.7, beta: float = 10.0, kappa: float = 1.01, iters: int = 20) -> QTransform:
    """Half-Quadratic Quantization zero points (Badri & Shaji 2023; module docstring) for every
    quantizable target, the scale fixed: the ``weight_qparams`` of a preceding search, else
    `choose_qparams`' min-max range. Defaults are the paper's (``p = 0.7``, ``beta = 10``,
    ``kappa = 1.01``, 20 steps). The weight spec must be asymmetric with
    ``zero_point_domain="float"``; follow with `rtn` to write the codes."""
    check_range("hqq", "norm", norm, 0, 2, open_lo=True, hint="(the paper uses p = 0.7)")
    check_range("hqq", "beta", beta, 0, open_lo=True)
    check_range("hqq", "kappa", kappa, 1)
    check_int("hqq", "iters", iters, 0, hint="(0 keeps RTN's zero points)")

    def update(view: BlockView, state: HQQState):
        specs, qparams = {}, dict(state.qparams)
        errors, iterations = dict(state.errors), dict(state.iterations)
        for name, spec in quantizable(view, "hqq"):
            if spec.zero_point_domain != "float":
                fail("hqq", view, name, f"its weight spec ({spec.bits}-bit {spec.format}, "
                     f"{'symmetric' if spec.symmetric else 'asymmetric'}) has no float zero point to optimize",
                     "quant_specs(weight=QSpec(..., format='uint', symmetric=False, zero_point_domain='float'))")
            w = checked_weight(view, name, "hqq")
            given = view.specs[name].weight_qparams
            scale, zp = given if given is not None else choose_qparams(w, spec)
            z, start, final, steps = hqq_zero_points(w, spec, scale, zp, norm=float(norm), beta=float(beta),
                                                     kappa=float(kappa), iters=iters)
            specs[name] = view.specs[name]._replace(weight_qparams=(scale, z))
            qparams[name], errors[name], iterations[name] = (scale, z), (start, final), steps
        return view.with_specs(specs), HQQState(qparams, errors, iterations)

    return QTransform(lambda view: HQQState({}, {}, {}), update)
