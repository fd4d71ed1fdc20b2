"""GPTQ weight rounding (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers").

For a linear with weight ``W [out, in]`` and calibration inputs ``X [n, in]``, GPTQ rounds ``W``
to the grid of its spec while minimizing the layer-output error ``||W X^T - Q X^T||_F^2``, i.e.
``tr((W - Q) H (W - Q)^T)`` with the proxy Hessian ``H = X^T X / n`` ([in, in]). Rows are
independent; all share ``H``. Columns are quantized one at a time (Optimal Brain Quantization);
after column ``j`` is fixed at ``q_j`` the still-free columns ``F`` absorb its error optimally:

    ``W[:, F] -= (w_j - q_j) / [H_{F'}^{-1}]_jj * [H_{F'}^{-1}]_{j, F}``,  ``F' = {j} + F``.

With the upper Cholesky factor ``U`` of ``H^{-1}`` (``H^{-1} = U^T U``) row ``j`` of ``U`` divided
by ``U_jj`` is exactly that row of the shrinking inverse, so one factorization serves every step:
``err_j = (w_j - q_j) / U_jj`` and ``W[:, F] -= err_j U_{j, F}`` (Algorithm 1 of the paper). The
updates of columns past the current block of ``block_size`` columns are applied lazily as one
matrix product per block, which gives the same result as the column-by-column recursion.

Details: columns with ``H_jj == 0`` saw no input ("dead"): their weight is zeroed and
``H_jj := 1``, with a warning naming the layer and the columns (a layer with no live column at all is
refused); ``lambda = damp * mean(diag H)`` is added to the diagonal, and if a Cholesky
factorization still fails the dampening is multiplied by 10 (a warning names the layer) up to
`MAX_DAMP_RETRIES` times. ``act_order`` sweeps columns by descending ``H_jj`` and restores the
order at the end. Qparams: per-channel / per-tensor from the whole weight before the sweep;
per-group, by default (``static_groups=True``, the ``static_groups`` option of AutoGPTQ /
GPTQModel), from each group of consecutive input columns of the weight before the sweep, so that
the permuted sweep rounds every column on its own group's grid; with ``static_groups=False``, when
the sweep first reaches a column of the group, from the group's current (already error-updated)
weights (the paper's choice in natural order). Under act_order that fixes a group's grid at the
first of its columns the sweep reaches, before most of them received their updates. On random
layers (``benchmarks/gptq_groups.py``) the dynamic grids are 1.006-1.008x (no outlier channels)
and 1.31-1.33x (outlier channels) worse on the layer objective at 2 bits, groups of 64 / 128,
1.29-1.69x in natural order; they win on average only under act_order at 3-4 bits, by 0.2-0.8%,
which is why the option stays. A ``qparams`` argument (a scale search's result) fixes the grid
instead; ``info["groups"]`` records which grid was used. The sum of ``err_j^2`` equals
``tr((W - Q) (H + lambda I) (W - Q)^T)`` (returned as ``info["obs_loss"]``), the identity the
tests check.

`sweep` also carries the asymmetric-calibration term of GPTAQ (see `qnpu.transforms.gptaq`).
"""
from __future__ import annotations

import warnings

import torch

from qnpu.qcore import QSpec, QTensor, choose_qparams, qparams_shape, quantize, zero_point_in_domain

from .base import QTransform, register_transform
from .checks import check_flags, check_int, check_range
from .rounder import dead_columns, hessian_of, weights_rounder
from .view import TransformError

MAX_DAMP_RETRIES = 5
_BASE = 512  # triangle sizes below which a LAPACK kernel beats splitting into GEMMs
_BASE_PRODUCT = 1024  # same for triangle-times-matrix products (splitting them costs copies)


def _error(method: str, label: str, problem: str, fix: str) -> TransformError:
    return TransformError(f"{method}: layer {label}: {problem}. Fix: {fix}")


def check_options(method: str, block_size, damp, act_order, static_groups) -> None:
    """ValueError naming the bad factory / core argument (`qnpu.transforms.checks`)."""
    check_int(method, "block_size", block_size, hint="(128 is the paper's)")
    check_range(method, "damp", damp, 0, open_lo=True, hint="(fraction of mean(diag H))")
    check_flags(method, act_order=act_order, static_groups=static_groups)


def _check_spec(method: str, label: str, spec: QSpec, shape: tuple[int, int]) -> None:
    if not isinstance(spec, QSpec):
        raise _error(method, label, f"spec is {type(spec).__name__}, not a QSpec", "pass a QSpec")
    if spec.format == "binary":
        raise _error(method, label, "format='binary' has no uniform grid for column-wise rounding",
                     "use billm() for 1-bit weights")
    if spec.granularity == "token" or spec.dynamic:
        raise _error(method, label, "weights need a static spec", "use a per-tensor, per-channel or per-group spec")
    if spec.granularity == "channel" and spec.axis not in (0, -2):
        raise _error(method, label, f"per-channel axis={spec.axis} would share a scale across output rows",
                     "use axis=0 (one scale per output channel)")
    if spec.granularity == "group":
        if spec.axis not in (-1, 1):
            raise _error(method, label, f"per-group axis={spec.axis} does not group input columns", "use axis=-1")
        if shape[1] % spec.group_size:
            raise _error(method, label, f"group_size={spec.group_size} does not divide in_features={shape[1]}",
                         "pick a divisor of in_features")


def _given_qparams(method, label, spec, shape, qparams, cdtype, device=None):
    want = qparams_shape(shape, spec)
    scale, zero_point = qparams
    try:
        scale = torch.as_tensor(scale, device=device).to(cdtype).expand(want).clone()
        if zero_point is not None:
            zero_point = zero_point_in_domain(zero_point, spec, cdtype, f"{method} {label}: qparams zero_point").expand(want).clone()
    except RuntimeError:
        raise _error(method, label, f"qparams do not broadcast to the natural shape {want}",
                     "pass (scale, zero_point) in the weight spec's qparams shape") from None
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise _error(method, label, "qparams scale is not finite and > 0 everywhere", "fix the scale search")
    if zero_point is None and not spec.symmetric:
        raise _error(method, label, "an asymmetric spec needs a zero point in qparams", "pass (scale, zero_point)")
    if zero_point is None and spec.format == "uint":
        zero_point = torch.full(want, spec.symmetric_zero, dtype=torch.int32, device=device)
    return scale, zero_point


def _finite(x: torch.Tensor) -> bool:
    # a NaN/Inf anywhere makes the sum non-finite; only then (or on overflow) look element-wise
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def _permuted(m: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``m[order][:, order]`` as a fresh tensor (row then column gathers beat 2-d fancy indexing)."""
    return m.index_select(0, order).index_select(1, order)


def _inverse_cholesky_reversed(hr: torch.Tensor) -> torch.Tensor | None:
    """Upper ``U`` with ``U^T U = h^{-1}`` from ``hr = J h J`` (``J`` the exchange matrix, i.e. ``h``
    with rows and columns in reverse order), or None if ``hr`` is not numerically positive definite.

    ``hr = L L^T`` gives ``h = R R^T`` with ``R = J L J`` upper, so ``h^{-1} = R^{-T} R^{-1}`` and
    ``U = R^{-1} = J L^{-1} J``: one factorization and one triangular inverse, no explicit ``h^{-1}``.
    """
    lower, info = torch.linalg.cholesky_ex(hr)
    if int(info) != 0:
        return None
    u = _lower_inverse(lower).flip(0, 1)
    # a NaN/Inf anywhere makes the sum non-finite: one cheap pass instead of an elementwise check
    if not bool(torch.isfinite(u.sum())) or not bool((torch.diagonal(u) > 0).all()):
        return None
    return u


def _lower_inverse(lower: torch.Tensor) -> torch.Tensor:
    """Inverse of a lower-triangular matrix by 2x2 blocks, ``[[A, 0], [C, D]]^{-1} =
    [[A^-1, 0], [-D^-1 C A^-1, D^-1]]`` with triangle-aware products: ~n^3/3 flops, nearly all in
    GEMMs (2-3x faster than a triangular solve against the identity, n^3 flops in TRSM), written
    in place into one output so no level allocates or copies a full-size block."""
    out = torch.empty_like(lower)
    _lower_inverse_into(lower, out)
    return out


def _lower_inverse_into(lower: torch.Tensor, out: torch.Tensor) -> None:
    n = lower.shape[0]
    if n <= _BASE:
        out.copy_(torch.linalg.solve_triangular(lower, torch.eye(n, dtype=lower.dtype, device=lower.device), upper=False))
        return
    h = n // 2
    _lower_inverse_into(lower[:h, :h], out[:h, :h])
    _lower_inverse_into(lower[h:, h:], out[h:, h:])
    out[:h, h:].zero_()
    c_a = torch.empty(n - h, h, dtype=lower.dtype, device=lower.device)
    _triangle_product_into(out[:h, :h], lower[h:, :h], c_a, left=False)
    _triangle_product_into(out[h:, h:], c_a, out[h:, :h], left=True)
    out[h:, :h].neg_()


def _triangle_product_into(t: torch.Tensor, x: torch.Tensor, out: torch.Tensor, left: bool) -> None:
    """``out = t @ x`` (``left``) or ``out = x @ t`` for lower-triangular ``t = [[P, 0], [Q, R]]``:
    ``t x = [P x1; Q x1 + R x2]``, ``x t = [x1 P + x2 Q, x2 R]`` (``x`` split along the side ``t`` meets)."""
    m = t.shape[0]
    if m <= _BASE_PRODUCT:
        out.copy_(t @ x if left else x @ t)
        return
    h = m // 2
    first, second = slice(None, h), slice(h, None)
    part = (lambda a, s: a[s]) if left else (lambda a, s: a[:, s])
    _triangle_product_into(t[first, first], part(x, first), part(out, first), left)
    _triangle_product_into(t[second, second], part(x, second), part(out, second), left)
    if left:
        out[second].addmm_(t[second, first], x[first])
    else:
        out[:, first].addmm_(x[:, second], t[second, first])


def _damped_factor(method: str, label: str, h: torch.Tensor, perm: torch.Tensor | None, damp: float):
    """``(U, damp used, lambda)`` for ``h[perm][:, perm] + lambda I`` (``perm=None``: natural
    order), escalating the dampening
    (x10, a warning naming the layer each time) until the factorization succeeds."""
    mean_diag = float(torch.diagonal(h).mean())
    hr = h.flip(0, 1) if perm is None else _permuted(h, perm.flip(0))
    added = 0.0
    for attempt in range(MAX_DAMP_RETRIES + 1):
        lam = damp * mean_diag
        hr.diagonal().add_(lam - added)
        added = lam
        u = _inverse_cholesky_reversed(hr)
        if u is not None:
            return u, damp, lam
        if attempt < MAX_DAMP_RETRIES:
            warnings.warn(f"{method}: layer {label}: the Hessian is not positive definite at damp={damp:g}; "
                          f"retrying with damp={damp * 10:g}", RuntimeWarning, stacklevel=4)
            damp *= 10
    raise _error(method, label, f"the Hessian is not positive definite even with damp={damp:g}",
                 "recollect calibration statistics (more tokens, finite activations) or pass a larger damp")


class _Grid:
    """Qparams as one row per group ([rows, out]; one row for per-channel / per-tensor specs) and the
    per-column rounding of the sweep.

    Rounding clamps ``v = w / s`` to ``[qmin - z, qmax - z]`` first and then rounds half-to-even
    with the float add/subtract of ``1.5 * 2^(mantissa bits)``, which is exact for these small
    magnitudes; both steps commute with qcore's ``clamp(round(v) + z)`` for integer bounds, so the
    sweep's ``q`` equals ``dequantize(quantize(w))`` bit for bit, without the slow scalar ``round``.
    """

    def __init__(self, spec: QSpec, rows: int, out: int, dtype: torch.dtype, device: torch.device):
        self.spec, self.out, self.dtype = spec, out, dtype
        self.scale = torch.ones(rows, out, dtype=dtype, device=device)
        self.zero = None
        self.lo = torch.full((rows, out), float(spec.qmin), dtype=dtype, device=device)
        self.hi = torch.full((rows, out), float(spec.qmax), dtype=dtype, device=device)
        self.ready = [False] * rows
        self.magic = 1.5 * 2.0 ** (52 if dtype == torch.float64 else 23)

    def set(self, row, scale: torch.Tensor, zero_point: torch.Tensor | None) -> None:
        """Fill ``row`` (an index or a slice) from natural-shape qparams of that row's weights."""
        self.scale[row] = _as_rows(scale, self.out)
        if zero_point is not None:
            if self.zero is None:
                self.zero = torch.zeros_like(self.scale)
            z = _as_rows(zero_point, self.out).to(self.dtype)
            self.zero[row] = z
            self.lo[row] = self.spec.qmin - z
            self.hi[row] = self.spec.qmax - z
        rows = range(len(self.ready))[row] if isinstance(row, slice) else [row]
        for r in rows:
            self.ready[r] = True

    def dequantized(self, w: torch.Tensor, row: int) -> torch.Tensor:
        s = self.scale[row]
        v = torch.div(w, s)
        v = torch.maximum(v, self.lo[row], out=v)
        v = torch.minimum(v, self.hi[row], out=v)
        return v.add_(self.magic).sub_(self.magic).mul_(s)

    def natural(self, granularity: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        zero = None if self.zero is None else self.zero.T.to(torch.int32).contiguous()
        if granularity == "tensor":
            return self.scale[0, 0].clone(), None if zero is None else zero[0, 0].clone()
        return self.scale.T.contiguous(), zero


def _as_rows(p: torch.Tensor, out: int) -> torch.Tensor:
    """Natural-shape qparams ([out, groups], [out, 1] or ()) -> [groups, out] rows."""
    return p.reshape(1, 1).expand(1, out) if p.dim() == 0 else p.T


def _columns(wt: torch.Tensor, u: torch.Tensor, p: torch.Tensor | None, grid: _Grid, row_of: list[int],
             members: list[torch.Tensor] | None, spec: QSpec, block_size: int) -> float:
    """Sweep the rows of ``wt`` ([in, out], sweep order) in place; returns ``sum err_j^2``.

    Afterwards row ``j`` holds column ``j``'s value when it was quantized. Within a block each
    column first gathers the pending updates of the block's earlier columns (one matrix-vector
    product, "left-looking"); after the block one GEMM updates every later column (the paper's
    lazy batch). Per-column work stays single-threaded and small: threaded small GEMMs (a
    right-looking rank-k update every few columns) were 3-4x slower on a busy 2-core machine.
    """
    n, out = wt.shape
    loss = torch.zeros((), dtype=torch.float64, device=wt.device)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        err = torch.empty(i2 - i1, out, dtype=wt.dtype, device=wt.device)
        for j in range(i1, i2):
            g = row_of[j]
            if not grid.ready[g]:
                s, z = choose_qparams(_current(wt, u, p, err, members[g], i1, j).T, spec)
                grid.set(g, s, z)
            w = wt[j]
            if j > i1:
                w.addmv_(err[:j - i1].T, u[i1:j, j], alpha=-1.0)
                if p is not None:
                    w.addmv_(wt[i1:j].T, p[i1:j, j])
            e = err[j - i1]
            torch.sub(w, grid.dequantized(w, g), out=e).div_(u[j, j])
            loss += torch.dot(e, e)  # per column: a whole-block reduction would run threaded
        if i2 < n:
            wt[i2:].addmm_(u[i1:i2, i2:].T, err, alpha=-1.0)
            if p is not None:
                wt[i2:].addmm_(p[i1:i2, i2:].T, wt[i1:i2])
    return float(loss)


def _current(wt, u, p, err, pos, i1, j) -> torch.Tensor:
    """Current values of rows ``pos`` (all ``>= j``) of ``wt``: they still lack the updates of the
    block's columns ``i1..j-1``, applied here."""
    cur = wt[pos]
    if j > i1:
        cur -= u[i1:j, pos].T @ err[:j - i1]
        if p is not None:
            cur += p[i1:j, pos].T @ wt[i1:j]
    return cur


def sweep(w: torch.Tensor, hessian: torch.Tensor, spec: QSpec, *, block_size: int = 128, damp: float = 0.01,
          act_order: bool = False, static_groups: bool = True, qparams: tuple | None = None,
          label: str = "layer", fp_cross: torch.Tensor | None = None, alpha: float = 0.25,
          method: str = "gptq") -> tuple[QTensor, dict]:
    """The column sweep shared by GPTQ and GPTAQ; see `gptq_quantize` and `gptaq_quantize`.

    ``fp_cross`` (``dXXT = (X_fp - X)^T X / n``, [in, in]) switches on GPTAQ's asymmetry term
    ``P = alpha * triu(dXXT U^T, 1) U``, i.e. ``P_{j,F} = alpha * dXXT_{j,F} (H_FF)^{-1}``: quantizing
    column ``j`` also adds ``w_j P_{j,F}`` to the free columns ``F``, ``w_j`` its value when quantized.
    """
    check_options(method, block_size, damp, act_order, static_groups)
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise _error(method, label, "the weight must be a floating [out, in] tensor", "pass the linear's weight")
    out, n = w.shape
    _check_spec(method, label, spec, (out, n))
    if not _finite(w):
        raise _error(method, label, "the weight has NaN/Inf values", "inspect the checkpoint")
    for name, mat in (("hessian", hessian), ("fp_cross", fp_cross)):
        if mat is None:
            continue
        if not isinstance(mat, torch.Tensor) or tuple(mat.shape) != (n, n):
            got = tuple(mat.shape) if isinstance(mat, torch.Tensor) else type(mat).__name__
            raise _error(method, label, f"{name} has shape {got}; the weight needs ({n}, {n})",
                         "collect the stats of this linear's input")
        if not _finite(mat):
            raise _error(method, label, f"{name} has NaN/Inf values (broken calibration data)",
                         "recollect calibration statistics; check the inputs for NaN/Inf or fp16 overflow")
    cdtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    h = hessian.detach().to(device=w.device, dtype=cdtype)
    dead = dead_columns(h, method, label)
    if bool(dead.any()):
        h = h.clone()
        h[dead, dead] = 1.0  # boolean masks pair up: only the dead diagonal entries
    wc = w.detach().to(cdtype)
    if bool(dead.any()):
        wc = wc.clone()
        wc[:, dead] = 0.0

    group = spec.granularity == "group"
    n_rows = n // spec.group_size if group else 1
    grid = _Grid(spec, n_rows, out, cdtype, w.device)
    if qparams is not None:
        grid.set(slice(None), *_given_qparams(method, label, spec, (out, n), qparams, cdtype, w.device))
        mode = "given"
    elif not group or static_groups:
        grid.set(slice(None), *choose_qparams(wc, spec))
        mode = "static" if group else "whole-weight"
    else:
        mode = "dynamic"

    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else torch.arange(n, device=w.device)
    u, damp_used, lam = _damped_factor(method, label, h, perm if act_order else None, float(damp))
    del h
    p = None
    if fp_cross is not None:
        cross = fp_cross.detach().to(device=w.device, dtype=cdtype)
        cross = _permuted(cross, perm) if act_order else cross.clone()
        cross[:, dead[perm]] = 0.0  # a dead input never reaches the quantized path's output
        p = (cross @ u.T).triu_(1).mul_(alpha) @ u
        del cross

    # row j = column perm[j] of W; always a fresh tensor, since the sweep writes into it
    wt = (wc.index_select(1, perm) if act_order else wc).T.clone(memory_format=torch.contiguous_format)
    del wc
    pos_of = torch.argsort(perm)
    col_group = (torch.arange(n, device=w.device) // spec.group_size if group
                 else torch.zeros(n, dtype=torch.long, device=w.device))
    members = [pos_of[g * spec.group_size:(g + 1) * spec.group_size] for g in range(n_rows)] if group else None
    loss = _columns(wt, u, p, grid, col_group[perm].tolist(), members, spec, block_size)
    del u, p

    if not bool(torch.isfinite(wt.sum())):
        raise _error(method, label, "the error-compensated weights overflowed", "pass a larger damp")
    wpre = wt.index_select(0, pos_of).T  # each column's value when it was quantized, in the original order
    scale, zero_point = grid.natural(spec.granularity)
    q = quantize(wpre, spec, scale=scale, zero_point=zero_point)
    info = {"damp": damp_used, "lambda": lam, "dead_columns": int(dead.sum()), "obs_loss": loss, "groups": mode}
    return QTensor(q.codes, q.scale, q.zero_point, spec, w.dtype), info


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, spec: QSpec, *, block_size: int = 128,
                  damp: float = 0.01, act_order: bool = False, static_groups: bool = True,
                  qparams: tuple | None = None, label: str = "layer") -> tuple[QTensor, dict]:
    """GPTQ-round ``w [out, in]`` under ``spec`` given ``hessian = X^T X / n`` ([in, in]).

    Returns the `QTensor` (natural layout of ``spec``; its dequantized value is exactly the ``Q``
    the sweep propagated errors from) and ``info``: ``damp`` (after any escalation), ``lambda``,
    ``dead_columns``, ``obs_loss`` (``tr((W - Q) (H + lambda I) (W - Q)^T)`` with dead columns
    of ``W`` zeroed) and ``groups``, the grid used: ``"static"`` / ``"dynamic"`` groups (module
    docstring), ``"whole-weight"`` (per-channel / per-tensor) or ``"given"`` (``qparams``). Math in
    the module docstring. Raises `TransformError` naming ``label`` for binary / dynamic specs,
    NaN/Inf in ``w`` or ``hessian``, a Hessian whose every column is dead (a RuntimeWarning names the dead columns when only some are) and a Hessian that no dampening fixes.
    Inputs are never modified; float32 math (float64 for a float64 ``w``).
    """
    return sweep(w, hessian, spec, block_size=block_size, damp=damp, act_order=act_order,
                 static_groups=static_groups, qparams=qparams, label=label)


@register_transform("gptq", reads={"hessian"})
def gptq(block_size: int = 128, damp: float = 0.01, act_order: bool = True, static_groups: bool = True) -> QTransform:
    """GPTQ (Frantar et al. 2022) on every target with a weight spec, using ``view.stats[name].hessian``
    and ``weight_qparams`` when a scale search set them; see `gptq_quantize`. State: `WeightsState`.
    The recipe's config records ``act_order`` and ``static_groups`` (the group mode)."""
    check_options("gptq", block_size, damp, act_order, static_groups)

    def round_weight(view, name, w, spec):
        return gptq_quantize(w, hessian_of(view, name, "gptq"), spec, block_size=block_size, damp=damp,
                             act_order=act_order, static_groups=static_groups,
                             qparams=view.specs[name].weight_qparams, label=view.label(name))[0]

    return weights_rounder("gptq", round_weight)
