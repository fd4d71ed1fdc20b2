"""Weight scale searches: choose each slice's ``(scale, zero_point)`` without touching the weights.

Every transform here sets ``LinearSpec.weight_qparams`` of each quantizable target to
``(scale, zero_point)`` in the natural qparams shape of its weight spec (``[out, 1]`` per channel,
``[out, in/g]`` per group, ``()`` per tensor; see `qnpu.qcore.layout`). A later weight rounder
(`rtn`, `gptq`, ...) rounds with them. A *slice* is the set of weights sharing one pair.

Clip ratio ``r`` of a slice (relative to the spec's own range, so ``r = 1`` is exactly
`qnpu.qcore.choose_qparams`)::

    symmetric:   scale = r c absmax / L                        (L = spec.symmetric_levels)
    asymmetric:  lo = min(r c min, 0), hi = max(r c max, 0),
                 scale = (hi - lo) / (qmax - qmin), zero_point = rint(qmin - lo / scale)

with ``c = spec.clip_ratio``. Shrinking the range trades clipping error on a few large weights
for a finer step on all others; the MSE search picks the best trade per slice. Binary specs have
no range to clip (``alpha = mean|w|`` is already the L2-optimal scale for sign codes), so every
search here gives them `choose_qparams`.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from qnpu.qcore import QSpec, choose_qparams
from qnpu.qcore.layout import normalized_axis, reduce

from .base import QTransform, register_state, register_transform
from .checks import check_flags, check_int, check_range
from .rounder import checked_weight, quantizable
from .view import BlockView, fail

# Elements of one [candidates, *weight] temporary; keeps a search of a 4096 x 11008 weight
# below a few hundred MB by evaluating the candidates in chunks.
CHUNK_ELEMENTS = 1 << 24


@register_state
class ScaleSearchState(NamedTuple):
    """Chosen weight qparams by linear name (relative to the block).

    qparams: ``name -> (scale, zero_point)``, natural shape, ``zero_point`` None for symmetric int.
    ratios:  ``name -> r c`` per slice (natural shape): the clip range as a fraction of the
             absmax / min-max range (ones for `minmax_scales`).
    """

    qparams: dict
    ratios: dict


# -- pure core: candidates, fake quantization and per-slice reductions with a leading candidate dim --
def compute_dtype(w: torch.Tensor) -> torch.dtype:
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def _with_candidates(c: torch.Tensor, ndim: int) -> torch.Tensor:
    return c.reshape(c.shape[0], *([1] * ndim))


def range_qparams(stat: tuple[torch.Tensor, ...], spec: QSpec, c) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Qparams from range statistics with clip factor ``c`` (a float, or a tensor broadcasting
    against the statistics): ``stat = (absmax,)`` if symmetric, ``(min, max)`` otherwise.

    Same arithmetic, in the same order, as `choose_qparams`, so ``c = spec.clip_ratio`` gives
    bit-identical parameters."""
    if spec.symmetric:
        scale = stat[0] * c / spec.symmetric_levels
        zero_point = None
        if spec.format == "uint":
            zero_point = torch.full(scale.shape, spec.symmetric_zero, dtype=torch.int32, device=scale.device)
    else:
        lo = torch.clamp(stat[0] * c, max=0.0)
        hi = torch.clamp(stat[1] * c, min=0.0)
        scale = (hi - lo) / (spec.qmax - spec.qmin)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero_point = torch.clamp(torch.round(spec.qmin - lo / safe), spec.qmin, spec.qmax).to(torch.int32)
    return torch.where(scale > 0, scale, torch.ones_like(scale)), zero_point


def clip_qparams(w: torch.Tensor, spec: QSpec, ratios: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Candidate qparams ``[C, *P]`` for clip ratios ``ratios [C]`` (``P`` the natural shape)."""
    wf = w.detach().to(compute_dtype(w))
    ops = ("absmax",) if spec.symmetric else ("amin", "amax")
    stats = tuple(reduce(wf, spec, op).unsqueeze(0) for op in ops)
    c = _with_candidates((ratios.double() * float(spec.clip_ratio)).to(wf.dtype), stats[0].ndim - 1)
    return range_qparams(stats, spec, c)


def expand_candidates(p: torch.Tensor, shape: tuple[int, ...], spec: QSpec) -> torch.Tensor:
    """Broadcast candidate qparams ``[C, *P]`` over ``[C, *shape]``."""
    if spec.granularity == "tensor":
        return _with_candidates(p, len(shape)).expand(p.shape[0], *shape)
    if spec.granularity == "group":
        p = p.repeat_interleave(spec.group_size, dim=normalized_axis(spec, len(shape)) + 1)
    return p.expand(p.shape[0], *shape)


def fake_quantize_candidates(w: torch.Tensor, spec: QSpec, scale: torch.Tensor,
                             zero_point: torch.Tensor | None) -> torch.Tensor:
    """``dequantize(quantize(w; scale_c, zero_point_c))`` for every candidate: ``[C, *w.shape]``,
    with the rounding (half-to-even) and clamping of `qnpu.qcore.quantize`."""
    wf = w.detach().to(scale.dtype)
    if spec.granularity == "group":
        # Broadcast over an unflattened group dim instead of materializing repeated qparams.
        axis = normalized_axis(spec, w.ndim)
        wf = wf.unflatten(axis, (w.shape[axis] // spec.group_size, spec.group_size))
        s = scale.unsqueeze(axis + 2)
        z = None if zero_point is None else zero_point.unsqueeze(axis + 2).to(scale.dtype)
    else:
        s = expand_candidates(scale, tuple(w.shape), spec)
        z = None if zero_point is None else expand_candidates(zero_point, tuple(w.shape), spec).to(scale.dtype)
    v = torch.round(wf / s)
    if z is None:
        out = torch.clamp(v, spec.qmin, spec.qmax) * s
    else:
        out = (torch.clamp(v + z, spec.qmin, spec.qmax) - z) * s
    return out.flatten(axis + 1, axis + 2) if spec.granularity == "group" else out


def slice_sums(e: torch.Tensor, spec: QSpec) -> torch.Tensor:
    """Sum ``e [C, *shape]`` over each slice: ``[C, *P]``."""
    ndim = e.ndim - 1
    if spec.granularity == "tensor":
        return e.flatten(1).sum(1)
    axis = normalized_axis(spec, ndim) + 1
    if spec.granularity == "channel":
        return e.sum(dim=[d for d in range(1, e.ndim) if d != axis], keepdim=True)
    grouped = e.unflatten(axis, (e.shape[axis] // spec.group_size, spec.group_size))
    return grouped.sum(axis + 1)


def pick(errors: torch.Tensor, candidates: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Per slice, the candidate with the smallest error (the first on ties): ``errors [C, *P]``,
    each of ``candidates`` ``[C, *P]`` -> ``[*P]``."""
    best = errors.argmin(0, keepdim=True)
    return tuple(None if t is None else t.gather(0, best).squeeze(0) for t in candidates)


def candidate_ratios(n: int, lowest: float, dtype: torch.dtype = torch.float64, *,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """``linspace(lowest, 1, n)`` with the last entry exactly 1 (the spec's own range), on ``device``."""
    r = torch.linspace(lowest, 1.0, n, dtype=torch.float64, device=device)
    r[-1] = 1.0
    return r.to(dtype)


def chunk_size(numel: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, numel))


def mse_qparams(w: torch.Tensor, spec: QSpec, *, grid: int = 100, min_ratio: float = 0.5, norm: float = 2.0,
                column_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Clip-ratio grid search per slice, as in the grid search of Frantar et al. 2022 (GPTQ's
    reference quantizer shrinks ``[min, max]`` by ``1 - i / grid`` and keeps the factor with the
    smallest ``sum |w - q|^p``) and of Lin et al. 2023 (AWQ's clipping search).

    For ``r`` in ``linspace(min_ratio, 1, grid)`` minimize ``E(r) = sum_k d_k |w_k - dq(q(w_k; r))|^p``
    over the elements ``k`` of each slice, ``p = norm``, ``d_k = column_weight[j(k)]`` (e.g. the
    Hessian diagonal ``H_jj`` of the input channel ``j``; all ones if None). ``r = 1`` is a
    candidate, so the result is never worse than `choose_qparams` on ``E``. All candidates of a
    chunk (``CHUNK_ELEMENTS`` bounds ``C * numel``) are evaluated as one ``[C, out, in]`` tensor op.
    ``w [out, in]``; returns ``(scale, zero_point, r c)`` in the natural shape ``P``."""
    if spec.format == "binary":
        scale, zp = choose_qparams(w, spec)
        return scale, zp, torch.ones_like(scale)
    ratios = candidate_ratios(grid, min_ratio, device=w.device)
    wf = w.detach().to(compute_dtype(w))
    d = None if column_weight is None else column_weight.to(wf.dtype).expand(wf.shape)
    errors, scales, zps = [], [], []
    step = chunk_size(w.numel())
    for start in range(0, grid, step):
        scale, zp = clip_qparams(wf, spec, ratios[start:start + step])
        diff = (wf - fake_quantize_candidates(wf, spec, scale, zp)).abs()
        e = diff.square() if norm == 2.0 else diff.pow(norm)
        errors.append(slice_sums(e if d is None else e * d, spec))
        scales.append(scale)
        zps.append(zp)
    scales = torch.cat(scales)
    r = _with_candidates(ratios.to(wf.dtype), scales.ndim - 1).expand_as(scales)
    scale, zp, chosen = pick(torch.cat(errors), (scales, None if zps[0] is None else torch.cat(zps), r))
    return scale, zp, chosen * float(spec.clip_ratio)


def as_slices(x: torch.Tensor, spec: QSpec) -> torch.Tensor:
    """``x`` as ``[S, k]``: one row per slice, in the row-major order of the natural shape."""
    if spec.granularity == "tensor":
        return x.reshape(1, -1)
    axis = normalized_axis(spec, x.ndim)
    if spec.granularity == "channel":
        return x.movedim(axis, 0).reshape(x.shape[axis], -1)
    return x.movedim(axis, -1).reshape(-1, spec.group_size)


def from_slices(v: torch.Tensor, shape: tuple[int, ...], spec: QSpec) -> torch.Tensor:
    """Inverse of `as_slices` for one value per slice ``v [S]`` -> natural shape."""
    if spec.granularity == "tensor":
        return v.reshape(())
    axis = normalized_axis(spec, len(shape))
    if spec.granularity == "channel":
        return v.reshape(tuple(n if i == axis else 1 for i, n in enumerate(shape)))
    rest = tuple(n for i, n in enumerate(shape) if i != axis)
    return v.reshape(rest + (shape[axis] // spec.group_size,)).movedim(-1, axis)


def row_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolation quantile of each row of ``x [S, k]`` (``q`` in [0, 1]); ``q = 1`` is the
    exact max and ``q = 0`` the exact min. Sorting avoids `torch.quantile`'s 2^24-element cap."""
    s, _ = torch.sort(x, dim=-1)
    pos = q * (x.shape[-1] - 1)
    i = min(int(math.floor(pos)), x.shape[-1] - 1)
    j = min(i + 1, x.shape[-1] - 1)
    frac = pos - i
    return s[:, i] + frac * (s[:, j] - s[:, i]) if frac else s[:, i]


def percentile_qparams(w: torch.Tensor, spec: QSpec, percentile: float = 99.9
                       ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Range = the ``percentile``-th percentile of ``|w|`` per slice (symmetric) or the
    ``(100 - p)``-th / ``p``-th percentiles of ``w`` (asymmetric), times ``spec.clip_ratio``.
    ``percentile = 100`` reproduces `choose_qparams` exactly; a slice whose percentile range is zero
    (mostly zeros) keeps its full range. Returns ``(scale, zero_point, fraction)`` with ``fraction``
    the clipped range over the full range."""
    if spec.format == "binary":
        scale, zp = choose_qparams(w, spec)
        return scale, zp, torch.ones_like(scale)
    wf = w.detach().to(compute_dtype(w))
    rows = as_slices(wf, spec)
    shape = tuple(w.shape)
    c = float(spec.clip_ratio)
    if spec.symmetric:
        full = (reduce(wf, spec, "absmax"),)
        stat = (from_slices(row_quantile(rows.abs(), percentile / 100), shape, spec),)
        width, full_width = stat[0], full[0]
    else:
        full = (reduce(wf, spec, "amin"), reduce(wf, spec, "amax"))
        stat = (from_slices(row_quantile(rows, 1 - percentile / 100), shape, spec),
                from_slices(row_quantile(rows, percentile / 100), shape, spec))
        width = stat[1].clamp(min=0) - stat[0].clamp(max=0)
        full_width = full[1].clamp(min=0) - full[0].clamp(max=0)
    # A slice that is mostly zeros can have a zero percentile range; keep its full range then
    # rather than the unit scale that a zero range would get.
    collapsed = width <= 0
    stat = tuple(torch.where(collapsed, f, p) for f, p in zip(full, stat))
    width = torch.where(collapsed, full_width, width)
    scale, zp = range_qparams(stat, spec, c)
    fraction = torch.where(full_width > 0, width / torch.where(full_width > 0, full_width, 1.0), 1.0) * c
    return scale, zp, fraction


# -- transforms ---------------------------------------------------------------------------------
def _search_transform(transform: str, choose) -> QTransform:
    """Set ``weight_qparams`` of every quantizable target to ``choose(view, name, w, spec)``."""

    def update(view: BlockView, state: ScaleSearchState):
        specs, qparams, ratios = {}, dict(state.qparams), dict(state.ratios)
        for name, spec in quantizable(view, transform):
            w = checked_weight(view, name, transform)
            scale, zp, ratio = choose(view, name, w, spec)
            specs[name] = view.specs[name]._replace(weight_qparams=(scale, zp))
            qparams[name], ratios[name] = (scale, zp), ratio
        return view.with_specs(specs), ScaleSearchState(qparams, ratios)

    return QTransform(lambda view: ScaleSearchState({}, {}), update)


@register_transform("minmax_scales", reads=())
def minmax_scales() -> QTransform:
    """The explicit baseline: absmax (symmetric) / min-max (asymmetric) qparams per slice, i.e.
    `qnpu.qcore.choose_qparams` on the current weight, fixed into ``weight_qparams``."""

    def choose(view, name, w, spec):
        scale, zp = choose_qparams(w, spec)
        return scale, zp, torch.full_like(scale, float(spec.clip_ratio))

    return _search_transform("minmax_scales", choose)


@register_transform("percentile_scales", reads=())
def percentile_scales(percentile: float = 99.9) -> QTransform:
    """Clip each slice at the ``percentile``-th percentile of ``|w|`` (symmetric) or at the
    ``100 - p`` / ``p`` percentiles of ``w`` (asymmetric); see `percentile_qparams`."""
    check_range("percentile_scales", "percentile", percentile, 0, 100, open_lo=True)

    def choose(view, name, w, spec):
        return percentile_qparams(w, spec, float(percentile))

    return _search_transform("percentile_scales", choose)


@register_transform("mse_scale_search", reads=lambda weighted, **_: {"hessian"} if weighted else ())
def mse_scale_search(grid: int = 100, min_ratio: float = 0.5, norm: float = 2.0,
                     weighted: bool = False) -> QTransform:
    """Per-slice clip-ratio grid search minimizing ``sum |w - dq(q(w; r))|^norm`` over ``grid``
    ratios in ``[min_ratio, 1]``, as in the grid search of Frantar et al. 2022 (GPTQ) and Lin et
    al. 2023 (AWQ); see `mse_qparams`. ``weighted=True`` weights each element by the Hessian
    diagonal ``H_jj = mean_n X[n, j]^2`` of its input channel (needs ``view.stats[name].hessian``):
    the output error of a row is ``||X (w - q)||^2 / n = (w - q)^T H (w - q)``, and keeping only the
    diagonal of ``H`` gives ``sum_j H_jj (w_j - q_j)^2`` (with ``norm = 2``), which stays separable
    per slice."""
    check_int("mse_scale_search", "grid", grid, 2)
    check_range("mse_scale_search", "min_ratio", min_ratio, 0, 1, open_lo=True)
    check_range("mse_scale_search", "norm", norm, 0, open_lo=True)
    check_flags("mse_scale_search", weighted=weighted)

    def choose(view, name, w, spec):
        d = None
        if weighted:
            st = view.stats.get(name)
            if st is None or st.hessian is None:
                fail("mse_scale_search", view, name,
                     "weighted=True needs the input Hessian, and none is in view.stats",
                     "calibrate this block (block_stats) before the search, or use weighted=False")
            d = torch.diagonal(st.hessian).clamp(min=0)
        return mse_qparams(w, spec, grid=grid, min_ratio=float(min_ratio), norm=float(norm), column_weight=d)

    return _search_transform("mse_scale_search", choose)
