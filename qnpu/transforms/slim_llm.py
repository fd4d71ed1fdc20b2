"""SliM-LLM (Huang et al. 2024, "SliM-LLM: Salience-Driven Mixed-Precision Quantization for LLMs").

Group-wise mixed precision at an exact average bit width, on top of a GPTQ sweep (Frantar et al.
2022). Per linear ``W [out, in]`` with input Hessian ``H [in, in]``, target ``bits = b`` and
``G = in / group_size`` groups of consecutive input columns:

1. OBS setup as in `qnpu.transforms.billm`: ``U`` = upper Cholesky factor of the damped ``H^-1``.
2. Group salience (the papers' Hessian salience ``w^2 / [H^-1]_jj^2``, with ``[H^-1]`` the
   Cholesky factor as in their reference code; see the BiLLM module):
   ``S_g = sum_{j in g} sum_i W_ij^2 / U_jj^2``, from the original weights.
3. Salience-driven bit allocation (SBA): sort groups by ``S_g`` (descending, stable); ``k`` pairs
   means the ``k`` most salient groups get ``b + 1`` bits and the ``k`` least salient get
   ``b - 1``, every other group ``b``. The mean over groups is ``b`` exactly for every ``k``
   (all groups have ``group_size`` columns, so it is also the mean bits per weight). The paper's
   double-pointer search moves a pointer in from each end of the sorted list in step; we evaluate
   every ``k in 0..min(G // 2, max_pairs)`` and keep the one with the smallest calibration
   objective ``tr((W - Q) H (W - Q)^T)`` of the *final* GPTQ result (deviation: the paper scores
   candidates by the output error of plain group quantization; we run the full sweep per
   candidate, which costs ``G // 2 + 1`` sweeps). ``k = 0`` (uniform ``b`` bits) is a candidate,
   so the result is never worse than uniform ``b``-bit GPTQ on that objective.
4. Quantization: a GPTQ sweep over columns with lazy updates per group: at the start of group
   ``g`` its per-row parameters are fitted to the current (error-compensated) weights, then each
   column is rounded and its error ``(w_j - q_j) / U_jj`` is fed forward, ``W[:, j:] -= err_j U[j, j:]``.
   Groups of ``bits_g >= 2`` bits get ``(scale, zero_point)`` of the target spec at ``bits_g`` bits
   (``spec.replace(bits=bits_g)``: format, symmetry, ``full_range`` and ``clip_ratio`` come from
   the spec). 1-bit groups are *binarized* as in the paper's reference code: per row,
   ``mu = mean(w)``, ``q = mu + a sign(w - mu)`` (sign(0) = +1), with ``a = mean|w - mu|`` (the
   least-squares scale for those signs; the reference takes ``mean|w|``, which ignores the offset:
   measured in docs/architecture.md). A 1-bit *grid* (``{0, x}`` asymmetric) would round most
   weights of a zero-centred row to 0.
5. Salience-weighted quantizer calibration (SQC), simplified: with ``sqc_grid = n > 1``, each
   group's per-row clip ratio ``c`` is searched over ``linspace(1, 0.5, n)`` (times the spec's
   ``clip_ratio``) minimizing ``sum_j H_jj (w_ij - q_ij)^2`` on the group's current weights, i.e.
   the diagonal-Hessian-weighted rounding error. The paper instead searches the quantizer scale
   with the salient elements' errors up-weighted; ``sqc_grid = 1`` turns the search off.

Specs: the weight spec must be ``int``/``uint`` with ``spec.bits == bits`` and per-channel or
per-group granularity with ``group_size`` equal to this transform's (the allocation, not the
spec, decides the bit width of each group). Symmetric specs need ``bits >= 3`` (a symmetric grid
has no 1-bit form). ``weight_qparams`` from a scale search are fitted at one bit width and are
rejected.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from qnpu.qcore import MixedTensor, QSpec, choose_qparams

from .base import QTransform, register_state, register_transform
from .billm import column_salience, hessian_error, inverse_hessian_cholesky
from .checks import check_choice, check_int, check_range
from .rounder import WeightsState, core_errors, hessian_of, live_hessian, no_scale_search, round_each, store
from .view import BlockView, fail


@register_state
class SlimWeight(NamedTuple):
    """One linear quantized by SliM-LLM (``G = in / group_size`` groups).

    group_bits:     int32 [G]: bit width of each group (mean exactly ``bits``).
    qweight:        the `MixedTensor` (codes, per-row per-group parameters, packed storage).
    group_salience: [G] ``S_g``; pairs: the ``k`` chosen; mean_bits: mean of ``group_bits``.
    objective:      [min(G // 2, max_pairs) + 1] float64 ``tr((W - Q_k) H (W - Q_k)^T)`` per ``k``.
    """

    group_bits: torch.Tensor
    qweight: MixedTensor
    group_salience: torch.Tensor
    pairs: int
    mean_bits: float
    group_size: int
    objective: torch.Tensor


@register_state
class SlimLLMState(NamedTuple):
    """`SlimWeight` (the search's record) by linear name (relative to the block), and the
    `WeightsState` holding each linear's `MixedTensor`: the channel every rounder's quantized
    weights go through (found by ``find_states(state, WeightsState)``)."""

    weights: dict
    quantized: WeightsState


def allocate_bits(salience: torch.Tensor, bits: int, pairs: int) -> torch.Tensor:
    """SBA: the ``pairs`` most salient groups get ``bits + 1``, the ``pairs`` least salient ``bits - 1``."""
    n = salience.numel()
    check_int("allocate_bits", "pairs", pairs, 0, n // 2, hint=f"(for {n} groups)")
    order = torch.argsort(salience, descending=True, stable=True)
    out = torch.full((n,), bits, dtype=torch.int32, device=salience.device)
    out[order[:pairs]] = bits + 1
    out[order[n - pairs:]] = bits - 1
    return out


def _group_spec(spec: QSpec, bits: int) -> QSpec:
    return spec.replace(bits=bits, granularity="channel", axis=0, group_size=None)


def _fit_group(x: torch.Tensor, spec: QSpec, h_diag: torch.Tensor, ratios: torch.Tensor):
    """Per-row ``(scale [out, 1], zero_point [out, 1] | None)`` of group ``x [out, g]``, the clip ratio
    per row chosen among ``ratios`` by diagonal-Hessian-weighted rounding error."""
    best = None
    for r in ratios.tolist():
        s = spec.replace(clip_ratio=spec.clip_ratio * r)
        scale, zp = choose_qparams(x, s)
        err = ((x - _round_to(x, scale, zp, s)) ** 2 * h_diag).sum(1, keepdim=True)
        if best is None:
            best = [err, scale, zp]
            continue
        better = err < best[0]
        best[0] = torch.where(better, err, best[0])
        best[1] = torch.where(better, scale, best[1])
        if zp is not None:
            best[2] = torch.where(better, zp, best[2])
    return best[1], best[2]


def _codes(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, spec: QSpec) -> torch.Tensor:
    v = torch.round(x / scale)
    if zp is not None:
        v = v + zp
    return torch.clamp(v, spec.qmin, spec.qmax)


def _round_to(x, scale, zp, spec):
    c = _codes(x, scale, zp, spec)
    return (c - zp if zp is not None else c) * scale


def binarize_params(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(a [out, 1], mu [out, 1])`` of a 1-bit group ``x [out, g]``: ``mu = mean(x)``,
    ``a = mean|x - mu|`` (module docstring, step 4)."""
    mu = x.mean(1, keepdim=True)
    return (x - mu).abs().mean(1, keepdim=True), mu


def _sign(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def mixed_gptq(w: torch.Tensor, u: torch.Tensor, h_diag: torch.Tensor, spec: QSpec, group_bits: torch.Tensor,
               group_size: int, sqc_grid: int = 1, dtype: torch.dtype | None = None,
               one_bit: str = "binarize") -> MixedTensor:
    """GPTQ sweep of ``w [out, in]`` (compute precision, dead columns zeroed) with the upper Cholesky
    factor ``u`` of the damped inverse Hessian, group ``g`` rounded at ``group_bits[g]`` bits
    (binarized at 1 bit; ``one_bit="grid"``, an ablation, rounds 1-bit groups to the spec's 1-bit
    grid instead, ``{0, x}`` when asymmetric). Returns the `MixedTensor` of the error-compensated weights."""
    check_choice("mixed_gptq", "one_bit", one_bit, ("binarize", "grid"))
    w = w.clone()
    out, n_in = w.shape
    n_groups = n_in // group_size
    dev = w.device
    ratios = torch.linspace(1.0, 0.5, sqc_grid, device=dev) if sqc_grid > 1 else torch.ones(1, device=dev)
    codes = torch.empty(out, n_in, dtype=torch.int16, device=dev)
    scales = torch.empty(out, n_groups, dtype=w.dtype, device=dev)
    means = torch.zeros(out, n_groups, dtype=w.dtype, device=dev)
    zps = torch.zeros(out, n_groups, dtype=torch.int32, device=dev)
    for g, i1 in enumerate(range(0, n_in, group_size)):
        i2 = i1 + group_size
        b = int(group_bits[g])
        binary = b == 1 and one_bit == "binarize"
        wb = w[:, i1:i2].clone()
        ub = u[i1:i2, i1:i2]
        if binary:
            scale, mu = binarize_params(wb)
            zp, gspec = None, None
            means[:, g] = mu[:, 0]
        else:
            gspec = _group_spec(spec, b)
            scale, zp = _fit_group(wb, gspec, h_diag[i1:i2], ratios)
            zps[:, g] = gspec.symmetric_zero if zp is None else zp[:, 0]
        scales[:, g] = scale[:, 0]
        err = torch.zeros_like(wb)
        for j in range(group_size):
            col = wb[:, j:j + 1]
            if binary:
                c = _sign(col - mu)
                q = mu + scale * c
            else:
                c = _codes(col, scale, zp, gspec)
                q = (c - zp if zp is not None else c) * scale
            codes[:, i1 + j:i1 + j + 1] = c.to(torch.int16)
            err[:, j:j + 1] = (col - q) / ub[j, j]
            wb[:, j:] -= err[:, j:j + 1] * ub[j:j + 1, j:]
        w[:, i2:] -= err @ u[i1:i2, i2:]
    bits = group_bits.to(torch.int32)
    if one_bit == "grid":  # stored as 2-bit groups: the 1-bit grid's codes and zero point fit there
        bits = torch.where(bits == 1, 2, bits)
    return MixedTensor(codes, bits, scales, zps, means, group_size, spec, dtype or w.dtype)


def slim_llm_quantize(w: torch.Tensor, hessian: torch.Tensor, spec: QSpec, *, bits: int, group_size: int,
                      damp: float = 0.01, sqc_grid: int = 10, max_pairs: int | None = None,
                      one_bit: str = "binarize") -> SlimWeight:
    """SliM-LLM on one weight (see the module docstring; ``one_bit`` as in `mixed_gptq`). Pure;
    ValueError for a bad Hessian or a ``group_size`` that does not divide ``in_features``."""
    out, n_in = w.shape
    if n_in % group_size:
        raise ValueError(f"group_size={group_size} does not divide in_features={n_in}")
    w_c, u = inverse_hessian_cholesky(w, hessian, damp)
    h = hessian.to(device=w_c.device, dtype=w_c.dtype)
    n_groups = n_in // group_size
    salience = column_salience(w_c, torch.diag(u)).reshape(n_groups, group_size).sum(1)
    k_max = n_groups // 2 if max_pairs is None else min(n_groups // 2, max_pairs)
    objective = torch.empty(k_max + 1, dtype=torch.float64, device=w_c.device)
    best = None
    for k in range(k_max + 1):
        alloc = allocate_bits(salience, bits, k)
        qw = mixed_gptq(w_c, u, torch.diag(h), spec, alloc, group_size, sqc_grid, dtype=w.dtype, one_bit=one_bit)
        objective[k] = hessian_error(w_c, qw.dequantize(w_c.dtype), h)
        if best is None or objective[k] < objective[best[0]]:
            best = (k, alloc, qw)
    k, alloc, qw = best
    return SlimWeight(group_bits=alloc, qweight=qw, group_salience=salience, pairs=k,
                      mean_bits=float(alloc.double().mean()), group_size=group_size, objective=objective)


def _check_spec(view: BlockView, name: str, spec: QSpec, bits: int, group_size: int) -> None:
    def bad(problem: str, fix: str) -> None:
        fail("slim_llm", view, name, problem, fix)

    want = (f"quant_specs(weight=QSpec(bits={bits}, symmetric=False, format='uint', granularity='group', "
            f"group_size={group_size}, axis=-1))")
    if spec.format == "binary":
        bad("the weight spec is binary", f"use an int/uint spec, e.g. {want}")
    if spec.bits != bits:
        bad(f"the weight spec has bits={spec.bits} but slim_llm(bits={bits}) allocates around {bits}",
            f"make them agree, e.g. {want}")
    if spec.granularity not in ("channel", "group") or (spec.granularity == "group" and spec.group_size != group_size):
        bad(f"slim_llm quantizes per row within groups of {group_size} columns, the spec says "
            f"granularity={spec.granularity!r}, group_size={spec.group_size}", f"use {want}")
    if spec.symmetric and bits - 1 < 2:
        bad(f"a symmetric grid cannot have {bits - 1} bit(s), which the allocation gives the least salient groups",
            f"use symmetric=False, e.g. {want}, or bits >= 3")
    no_scale_search(view, name, "slim_llm", "each group's bit width is chosen here")
    n_in = view.weight(name).shape[1]
    if n_in % group_size:
        divisors = [d for d in range(1, n_in + 1) if n_in % d == 0]
        bad(f"group_size={group_size} does not divide in_features={n_in}",
            f"pick a group size from {divisors}, or route this layer elsewhere with masked()/partition()")


@register_transform("slim_llm", reads={"hessian"})
def slim_llm(bits: int = 2, group_size: int = 128, damp: float = 0.01, sqc_grid: int = 10,
             max_pairs: int | None = None) -> QTransform:
    """SliM-LLM mixed-precision GPTQ of every target with a weight spec (Huang et al. 2024).

    Groups of ``group_size`` input columns get ``bits - 1``, ``bits`` or ``bits + 1`` bits with
    mean exactly ``bits``; ``max_pairs`` caps the promoted/demoted pairs searched (None: all).
    ``params["<name>.weight"]`` becomes the dequantized result (same shape and dtype);
    `SlimLLMState.weights[name]` holds the `SlimWeight` and ``SlimLLMState.quantized`` the
    `WeightsState` of the `MixedTensor` s. See the module docstring.
    """
    check_int("slim_llm", "bits", bits, 2, 7)
    check_int("slim_llm", "group_size", group_size)
    check_int("slim_llm", "sqc_grid", sqc_grid)
    check_int("slim_llm", "max_pairs", max_pairs, 0, none="all pairs")
    check_range("slim_llm", "damp", damp, 0, open_lo=True)

    def check(view, name, spec):
        _check_spec(view, name, spec, bits, group_size)
        live_hessian(view, name, "slim_llm")  # warns, or refuses a layer with no live input

    def round_weight(view, name, w, spec):
        with core_errors(view, name, "slim_llm", "increase damp or recalibrate with more tokens"):
            return slim_llm_quantize(w, hessian_of(view, name, "slim_llm"), spec, bits=bits, group_size=group_size,
                                     damp=damp, sqc_grid=sqc_grid, max_pairs=max_pairs)

    def update(view: BlockView, state: SlimLLMState):
        results = round_each(view, "slim_llm", round_weight, check=check)
        view, quantized = store(view, state.quantized, {name: sw.qweight for name, sw in results.items()})
        return view, SlimLLMState({**state.weights, **results}, quantized)

    return QTransform(lambda view: SlimLLMState({}, WeightsState({})), update)
