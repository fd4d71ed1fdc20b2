"""BiLLM (Huang et al. 2024, "BiLLM: Pushing the Limit of Post-Training Quantization for LLMs").

Per linear ``W [out, in]`` with input Hessian ``H = X^T X / n [in, in]``:

1. OBS setup (as GPTQ, Frantar et al. 2022): damp ``H + damp * mean(diag H) * I``, zero dead
   columns (``H_jj = 0``), and take ``U``, the upper Cholesky factor of the damped ``H^-1``.
   ``U_jj^2 = [H_F^-1]_jj`` is the OBS denominator of column ``j`` when the columns before it
   have been fixed (``F`` = columns ``j..in-1``).
2. Columns are processed in blocks of ``block_size``. At the start of each block, from the block's
   current (error-compensated) weights ``W_b``:

   * column salience ``s_j = sum_i W_ij^2 / U_jj^2`` (the papers write ``w^2 / [H^-1]_jj^2``
     with ``[H^-1]`` standing for this Cholesky factor, as their reference code does);
   * salient columns: the ``k`` most salient. With ``salient_fraction=None`` a structural search
     picks ``k in 0..floor(max_salient_fraction * n_b)`` (at most half the block) minimizing the
     binarization error ``sum_j ||w_j - b_j||^2 / U_jj^2`` with the top-``k`` columns residual-
     binarized and the others binarized first-order as one group (the split is left out of this
     search to keep it cheap). Deviation from the paper, whose search minimizes the unweighted
     error: the OBS weight ``1 / U_jj^2`` ties the search to the calibration objective. Measured
     on `qnpu.testing.random_block` seeds 0-3 (28 linears, mean of tr(dH d^T) relative to
     ``k = 0``, cap 0.2): unweighted 0.58 at 1.19 sign bits, weighted 0.22 at 1.06 sign bits.
     A fixed ``salient_fraction`` uses ``k = round(salient_fraction * n_b)``;
   * residual (second-order) binarization of salient weights, per row ``i`` of the block:
     ``B1 = mu1 + a1 sign(W - mu1)``, ``B2 = mu2 + a2 sign(W - B1 - mu2)``, ``a = mean|. - mu|``,
     ``mu = mean(.)`` over the row's salient entries (``mu = 0`` with ``mean_offsets=False``);
   * non-salient "bell-shaped" split: a break point ``p`` (searched over ``split_grid`` quantiles
     in [0.1, 0.9] of ``|W_N|``) splits ``N`` into concentrated ``|w| <= p`` and sparse
     ``|w| > p`` weights, each binarized once with its own per-row ``(a, mu)``; ``p`` minimizes
     the squared binarization error of ``N``. ``split=False`` binarizes ``N`` as one group.
3. Inside the block the parameters (masks, ``a``, ``mu``) stay fixed and columns are binarized one
   by one with OBS error feedback ``err_j = (w_j - q_j) / U_jj``, ``W[:, j:] -= err_j U[j, j:]``
   (within the block), then ``W[:, end:] -= Err U[block, end:]`` (lazy batch, as GPTQ). The
   reference code binarizes each block without the within-block feedback; we keep it, which is
   GPTQ's exact sequential update for parameters fixed per block.

Storage (`qnpu.qcore.BiLLMTensor`, which gives the exact byte layout) per linear with ``n = out * in``
weights and ``n_s`` salient columns: sign bits ``n + out * n_s`` (first- and second-order planes),
the split bitmap ``out * (in - n_s)`` (split=True), the salient-column bitmap ``in``, and per row
and block the scales and offsets of the components in use, at the compute precision (fp32 for
float32 / bfloat16 weights, 32 bits each)::

    bits_per_weight       = 8 * packed_nbytes / n
    paper_bits_per_weight = (sign bits) / n = 1 + n_s / in   (the paper's headline "1.08 bits")

The paper's headline 1.08-1.1 bits equals the sign bits alone (``2 r + (1 - r)`` for a salient
fraction ``r``); the split bitmap costs one more bit per non-salient weight, and the per-row,
per-block fp32 scales and offsets ``32 * C * 2 / block_size`` (``C`` = 3-4 components: 2 bits at
block 128), so the honest storage is 4-5 bits per weight at block 128 (use ``split=False,
mean_offsets=False`` and a large block for ~1.2-1.5 bits). Both numbers are recorded.

Spec: BiLLM needs the target's weight spec only to know that it is binarized; it must be
``format="binary"`` (e.g. ``QSpec(bits=1, format="binary")``); its granularity is not used (scales
are per row and per block). A preceding scale search's ``weight_qparams`` cannot be honoured and
is rejected.
"""
from __future__ import annotations

import math

import torch

from qnpu.qcore import BiLLMTensor

from .base import QTransform, register_transform
from .checks import check_flags, check_int, check_range
from .rounder import core_errors, hessian_of, live_hessian, no_scale_search, weights_rounder
from .view import fail

# the weight BiLLM produces: codes, masks and per-row per-block (a, mu) (`qnpu.qcore.BiLLMTensor`)
BinarizedWeight = BiLLMTensor


# -- shared OBS helpers (also used by slim_llm) ----------------------------------------------------
def compute_dtype(w: torch.Tensor) -> torch.dtype:
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def inverse_hessian_cholesky(w: torch.Tensor, hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W', U)``: ``W`` in compute precision with dead columns (``H_jj = 0``) zeroed, and the upper
    Cholesky factor ``U`` of ``(H + damp * mean(diag H) I)^-1`` (``H_jj := 1`` on dead columns).
    Raises ValueError when the damped Hessian is not positive definite."""
    dt = compute_dtype(w)
    if hessian.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match in_features={w.shape[1]}")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("the Hessian has NaN/Inf entries")
    h = hessian.detach().to(device=w.device, dtype=dt).clone()
    w = w.detach().to(dt).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    idx = torch.arange(h.shape[0], device=h.device)
    h[idx, idx] += damp * torch.mean(torch.diag(h))
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise ValueError("the damped Hessian is not positive definite")
    u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
    if int(info) != 0:
        raise ValueError("the inverse Hessian is not positive definite")
    return w, u


def column_salience(w: torch.Tensor, u_diag: torch.Tensor) -> torch.Tensor:
    """OBS column salience ``s_j = sum_i W_ij^2 / U_jj^2`` ([in])."""
    return (w ** 2).sum(0) / u_diag ** 2


def hessian_error(w: torch.Tensor, q: torch.Tensor, hessian: torch.Tensor) -> float:
    """The calibration objective ``tr((W - Q) H (W - Q)^T)`` in float64."""
    d = (w.double() - q.double())
    return float(torch.einsum("oi,ij,oj->", d, hessian.double(), d))


def _sign(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


# -- binarizers ------------------------------------------------------------------------------------
def _masked_fit(x: torch.Tensor, mask: torch.Tensor, offsets: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(a, mu)`` over the entries of ``x`` where ``mask``: ``mu = mean``, ``a = mean|x - mu|``."""
    m = mask.to(x.dtype)
    count = m.sum(-1).clamp(min=1)
    mu = (x * m).sum(-1) / count if offsets else torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
    a = ((x - mu.unsqueeze(-1)).abs() * m).sum(-1) / count
    return a, mu


def _binarize(x: torch.Tensor, a: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    return mu.unsqueeze(-1) + a.unsqueeze(-1) * _sign(x - mu.unsqueeze(-1))


def _fit_error(x: torch.Tensor, col_weight: torch.Tensor, offsets: bool, order: int) -> float:
    """Column-weighted squared error ``sum_ij c_j (x_ij - b_ij)^2`` of binarizing ``x [out, m]`` with
    per-row parameters, first-order (``order=1``) or residual second-order (``order=2``)."""
    if x.shape[1] == 0:
        return 0.0
    full = torch.ones_like(x, dtype=torch.bool)
    r = x
    for _ in range(order):
        r = r - _binarize(r, *_masked_fit(r, full, offsets))
    return float(((r ** 2) * col_weight).sum())


def _choose_k(wb: torch.Tensor, order: torch.Tensor, col_weight: torch.Tensor, k_max: int, offsets: bool) -> int:
    """Salient-column count: the ``k`` minimizing the OBS-weighted error of binarizing the top-``k``
    columns with the residual scheme and the rest first-order (the split is left out here)."""
    best_k, best = 0, math.inf
    for k in range(k_max + 1):
        s, n = order[:k], order[k:]
        err = (_fit_error(wb[:, s], col_weight[s], offsets, 2)
               + _fit_error(wb[:, n], col_weight[n], offsets, 1))
        if err < best:
            best_k, best = k, err
    return best_k


def quantiles(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """``torch.quantile(x, levels)`` (linear interpolation between the order statistics at rank
    ``q * (n - 1)``) for a 1-d ``x`` of any size: one sort instead of torch.quantile, which raises
    above 2^24 elements. Same rank and ``torch.lerp`` arithmetic, so the values are identical."""
    s = torch.sort(x).values
    ranks = levels.to(x.dtype) * (s.numel() - 1)
    below = ranks.to(torch.int64)
    above = torch.ceil(ranks).to(torch.int64)
    return torch.lerp(s[below], s[above], ranks - below)


def _choose_split(x: torch.Tensor, offsets: bool, grid: int) -> torch.Tensor:
    """Sparse mask ``|x| > p`` of the non-salient weights ``x [out, m]`` minimizing the error of
    binarizing the two groups separately (``p`` over quantiles 0.1..0.9 of ``|x|``)."""
    ax = x.abs()
    levels = torch.linspace(0.1, 0.9, grid, dtype=x.dtype, device=x.device)
    cands = quantiles(ax.flatten(), levels)
    best_mask, best = torch.zeros_like(x, dtype=torch.bool), math.inf
    for p in cands:
        sparse = ax > p
        err = 0.0
        for m in (sparse, ~sparse):
            b = _binarize(x, *_masked_fit(x, m, offsets))
            err += float((((x - b) ** 2) * m).sum())
        if err < best:
            best_mask, best = sparse, err
    return best_mask


def _block_params(wb, u_diag, *, salient_fraction, max_salient_fraction, split, offsets, split_grid):
    """Masks and per-row parameters of one block ``wb [out, nb]`` (see the module docstring)."""
    out, nb = wb.shape
    order = torch.argsort(column_salience(wb, u_diag), descending=True, stable=True)
    if salient_fraction is None:
        k_max = min(nb // 2, int(max_salient_fraction * nb))
        k = _choose_k(wb, order, 1.0 / u_diag ** 2, k_max, offsets)
    else:
        k = min(nb // 2, int(round(salient_fraction * nb)))
    sal = torch.zeros(nb, dtype=torch.bool, device=wb.device)
    sal[order[:k]] = True
    scale = torch.zeros(4, out, dtype=wb.dtype, device=wb.device)
    offset = torch.zeros(4, out, dtype=wb.dtype, device=wb.device)
    if k:
        xs = wb[:, sal]
        full = torch.ones_like(xs, dtype=torch.bool)
        scale[0], offset[0] = _masked_fit(xs, full, offsets)
        r = xs - _binarize(xs, scale[0], offset[0])
        scale[1], offset[1] = _masked_fit(r, full, offsets)
    xn = wb[:, ~sal]
    sparse_n = _choose_split(xn, offsets, split_grid) if split else torch.zeros_like(xn, dtype=torch.bool)
    scale[2], offset[2] = _masked_fit(xn, ~sparse_n, offsets)
    scale[3], offset[3] = _masked_fit(xn, sparse_n, offsets)
    sparse = torch.zeros(out, nb, dtype=torch.bool, device=wb.device)
    sparse[:, ~sal] = sparse_n
    return sal, sparse, scale, offset


def _binarize_column(w, salient, sparse_col, scale, offset):
    """``(q, first code, residual code or None)`` of one column with its block's fixed parameters."""
    if salient:
        c1 = _sign(w - offset[0])
        b1 = offset[0] + scale[0] * c1
        c2 = _sign(w - b1 - offset[1])
        return b1 + (offset[1] + scale[1] * c2), c1, c2
    a = torch.where(sparse_col, scale[3], scale[2])
    mu = torch.where(sparse_col, offset[3], offset[2])
    c = _sign(w - mu)
    return mu + a * c, c, None


# -- public core -------------------------------------------------------------------------------
def billm_dequantize(bw: BiLLMTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight a `BiLLMTensor` stands for (`BiLLMTensor.dequantize`)."""
    return bw.dequantize(dtype)


def billm_quantize(w: torch.Tensor, hessian: torch.Tensor, *, block_size: int = 128,
                   salient_fraction: float | None = None, max_salient_fraction: float = 0.2,
                   split: bool = True, mean_offsets: bool = True, split_grid: int = 40,
                   damp: float = 0.01) -> BiLLMTensor:
    """Binarize ``w [out, in]`` with BiLLM against ``hessian [in, in]`` (see the module docstring).
    Pure: ``w`` and ``hessian`` are not modified. Raises ValueError for a bad Hessian."""
    w_c, u = inverse_hessian_cholesky(w, hessian, damp)
    out, n_in = w_c.shape
    dt = w_c.dtype
    nblocks = -(-n_in // block_size)
    dev = w_c.device
    codes = torch.empty(out, n_in, dtype=dt, device=dev)
    residual = torch.zeros(out, n_in, dtype=dt, device=dev)
    salient = torch.zeros(n_in, dtype=torch.bool, device=dev)
    sparse = torch.zeros(out, n_in, dtype=torch.bool, device=dev)
    scale = torch.zeros(4, out, nblocks, dtype=dt, device=dev)
    offset = torch.zeros(4, out, nblocks, dtype=dt, device=dev)
    for b, i1 in enumerate(range(0, n_in, block_size)):
        i2 = min(i1 + block_size, n_in)
        wb = w_c[:, i1:i2].clone()
        ub = u[i1:i2, i1:i2]
        sal, sp, sc, off = _block_params(wb, torch.diag(ub), salient_fraction=salient_fraction,
                                         max_salient_fraction=max_salient_fraction, split=split,
                                         offsets=mean_offsets, split_grid=split_grid)
        salient[i1:i2], sparse[:, i1:i2], scale[:, :, b], offset[:, :, b] = sal, sp, sc, off
        err = torch.zeros_like(wb)
        for j in range(i2 - i1):
            q, c1, c2 = _binarize_column(wb[:, j], bool(sal[j]), sp[:, j], sc, off)
            codes[:, i1 + j] = c1
            if c2 is not None:
                residual[:, i1 + j] = c2
            err[:, j] = (wb[:, j] - q) / ub[j, j]
            wb[:, j:] -= err[:, j:j + 1] * ub[j:j + 1, j:]
        w_c[:, i2:] -= err @ u[i1:i2, i2:]
    return BiLLMTensor(
        codes=codes.to(torch.int8), residual_codes=residual[:, salient].to(torch.int8), salient=salient,
        sparse=sparse, scale=scale, offset=offset, block_size=block_size, split=split,
        mean_offsets=mean_offsets, dtype=w.dtype)


# -- the transform -----------------------------------------------------------------------------
@register_transform("billm", reads={"hessian"})
def billm(block_size: int = 128, salient_fraction: float | None = None, max_salient_fraction: float = 0.2,
          split: bool = True, mean_offsets: bool = True, split_grid: int = 40, damp: float = 0.01) -> QTransform:
    """BiLLM binarization of every target with a ``format="binary"`` weight spec (Huang et al. 2024).

    ``params["<name>.weight"]`` becomes the dequantized result (same shape and dtype) and
    `WeightsState.qweights[name]` holds the `BiLLMTensor` (codes, masks, scales, bit counts): the
    channel every rounder's quantized weights go through.
    ``salient_fraction=None`` searches the salient-column count per block up to
    ``max_salient_fraction`` of its columns; a number fixes it. See the module docstring for the
    math and the exact bit accounting.
    """
    check_int("billm", "block_size", block_size)
    check_range("billm", "salient_fraction", salient_fraction, 0, 0.5, none="search")
    check_range("billm", "max_salient_fraction", max_salient_fraction, 0, 0.5)
    check_flags("billm", split=split, mean_offsets=mean_offsets)
    check_int("billm", "split_grid", split_grid)
    check_range("billm", "damp", damp, 0, open_lo=True)

    def check(view, name, spec):
        if spec.format != "binary":
            fail("billm", view, name, f"the weight spec has format={spec.format!r}, BiLLM binarizes",
                 "set quant_specs(weight=QSpec(bits=1, format='binary')) for the layers billm() quantizes")
        no_scale_search(view, name, "billm", "BiLLM fits its own per-row, per-block scales")
        live_hessian(view, name, "billm")  # warns, or refuses a layer with no live input

    def round_weight(view, name, w, spec):
        with core_errors(view, name, "billm", "increase damp or recalibrate with more tokens"):
            return billm_quantize(w, hessian_of(view, name, "billm"), block_size=block_size,
                                  salient_fraction=salient_fraction, max_salient_fraction=max_salient_fraction,
                                  split=split, mean_offsets=mean_offsets, split_grid=split_grid, damp=damp)

    return weights_rounder("billm", round_weight, check=check)
