"""SmoothQuant (Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization
for Large Language Models"): move activation outliers into the weights before W8A8.

A *producer* P writes ``X [n, c]``, read by *consumers* ``W_1..W_k`` (``[out_i, c]``). With one
scale per channel ``j``

    s_j = max_n |X[n, j]|^alpha / max_{i, r} |W_i[r, j]|^(1 - alpha)      (clamped to [1e-5, 1e5])

the consumers see ``X' = X diag(1/s)`` and hold ``W_i' = W_i diag(s)``, so ``X' W_i'^T = X W_i^T``
exactly while the activation range per channel is flattened (alpha=1: all difficulty to the
weights; alpha=0: none). ``max|X_j|`` is the consumers' calibration ``absmax`` (a shared input),
``max|W_j|`` the column absmax over *all* consumers. ``1/s`` is folded into the producer:

``"norms"`` pairs   RMSNorm -> q/k/v and RMSNorm -> gate/up: ``g' = g / s``.
``"all"``           also v -> o and up -> down, where the producer's output rows (and bias) are
                    divided by ``s``. Attention is linear in V (softmax rows sum to 1), and
                    ``silu(gate) * up`` is linear in up, so both folds are exact. With grouped-query
                    attention, v's output channel ``(kv head c, dim d)`` reaches o's input columns
                    ``(h, d)`` of every query head ``h`` with ``h // (num_heads / num_kv_heads) == c``:
                    its scale uses the max over those columns and is repeated for o.

Statistics of each consumer are mapped to the new input ``X' = X diag(1/s)``: ``H' = D H D`` with
``D = diag(1/s)``, ``absmax' = absmax / s``, ``tokens' = tokens / s``, ``fp_tokens' = fp_tokens / s``,
``fp_cross' = D fp_cross D``.

Smoothing only pays off when activations are quantized, so every consumer must have an
activation spec. ``search=True`` picks alpha from a grid by the block's output error under
fake quantization (see `smoothquant`).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from qnpu.qcore import fake_quantize, mse

from .base import QTransform, register_state, register_transform
from .block import block_forward
from .checks import check_choice, check_flags, check_range, refuse
from .stats import scale_stats
from .view import BlockStructure, BlockView, fail

NAME = "smoothquant"
PAIR_MODES = ("norms", "all")
DEFAULT_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
_LO, _HI = 1e-5, 1e5


@register_state
class SmoothState(NamedTuple):
    """scales: producer name (a norm, ``v_proj`` or ``up_proj``) -> ``s`` over the producer's output
    channels (for v -> o: ``[num_kv_heads * head_dim]``, repeated per query head on o's columns).
    alpha: the migration strength used in this block (the searched one when ``search=True``).
    search_errors: the error of each grid alpha, in grid order (empty without search)."""

    scales: dict
    alpha: float
    search_errors: tuple = ()


class _Pair(NamedTuple):
    producer: str
    is_norm: bool
    consumers: tuple[str, ...]


def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = max|X|^alpha / max|W|^(1-alpha)`` per channel (float32), inputs clamped at 1e-5 and
    ``s`` clamped to [1e-5, 1e5] so neither a dead channel nor a zero weight column yields 0 or inf."""
    a = act_absmax.detach().float().clamp(min=_LO)
    w = weight_absmax.detach().float().clamp(min=_LO)
    return (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(_LO, _HI)


def _heads_to_kv(t: torch.Tensor, s: BlockStructure) -> torch.Tensor:
    """``[num_heads * head_dim]`` (o's input columns) -> ``[num_kv_heads * head_dim]``: max over the
    query heads that read the same kv head."""
    group = s.num_heads // s.num_kv_heads
    return t.reshape(s.num_kv_heads, group, s.head_dim).amax(1).reshape(-1)


def _kv_to_heads(t: torch.Tensor, s: BlockStructure) -> torch.Tensor:
    group = s.num_heads // s.num_kv_heads
    return t.reshape(s.num_kv_heads, 1, s.head_dim).expand(-1, group, -1).reshape(-1)


def _pairs(view: BlockView, mode: str) -> list[_Pair]:
    """The pairs whose consumers are all targets; a pair split by the mask is an error, since the
    shared input (and so every reader's weight) must be rescaled together."""
    s = view.structure
    # Linear pairs first: their row scaling of v/up changes the column maxima that the norm pairs'
    # scales read, so this order leaves every pair balanced in the final weights.
    candidates = [_Pair(p, False, tuple(c)) for p, c in s.linear_pairs] if mode == "all" else []
    candidates += [_Pair(n, True, tuple(c)) for n, c in s.norm_pairs]
    targets, active = set(view.targets), []
    for pair in candidates:
        inside = [c for c in pair.consumers if c in targets]
        if not inside:
            continue
        if len(inside) < len(pair.consumers):
            others = [view.label(c) for c in pair.consumers if c not in targets]
            fail(NAME, view, inside[0], f"it shares its input with {others}, which are not targets",
                 "smooth all readers of one input together: widen the mask to include them or exclude them all")
        active.append(pair)
    return active


def _check(view: BlockView, pairs: list[_Pair]) -> None:
    # Smoothing commutes with a channel-wise scale only; an online Hadamard in front of a consumer
    # mixes channels.
    online = view.online_hadamard
    for pair in pairs:
        for c in pair.consumers:
            spec = view.specs.get(c)
            if spec is None or spec.activation is None:
                fail(NAME, view, c, "its input activation has no quantization spec, so smoothing gains "
                     "nothing (it only helps quantized activations)",
                     f"put quant_specs(activation=QSpec(...)) before {NAME}() in the chain, or leave "
                     "this layer out of its targets with masked()")
            st = view.stats.get(c)
            if st is None or st.absmax is None:
                fail(NAME, view, c, "no calibration absmax of its input",
                     "calibrate the block so view.stats[name].absmax is set")
            if not bool(torch.isfinite(st.absmax).all()):
                fail(NAME, view, c, "its input absmax has NaN/Inf values", "inspect the calibration data")
            if c in online:
                fail(NAME, view, c, "its input passes an online Hadamard rotation, which smoothing "
                     "cannot be folded through", f"use pairs='norms', or apply {NAME} before the rotation")


def _pair_scales(view: BlockView, pair: _Pair, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s over the producer's output channels, s over the consumers' input columns)."""
    act = torch.stack([view.stats[c].absmax.float() for c in pair.consumers]).amax(0)
    wmax = torch.stack([view.weight(c).detach().float().abs().amax(0) for c in pair.consumers]).amax(0)
    s = view.structure
    if pair.producer == s.v:
        sv = smoothing_scales(_heads_to_kv(act, s), _heads_to_kv(wmax, s), alpha)
        return sv, _kv_to_heads(sv, s)
    scale = smoothing_scales(act, wmax, alpha)
    return scale, scale


def smooth(view: BlockView, pairs: list[_Pair], alpha: float) -> tuple[BlockView, dict]:
    """Fold the scales of ``alpha`` into every pair in turn (a producer such as v_proj may also be
    an earlier pair's consumer); returns the new view and ``{producer: s}``."""
    scales = {}
    for pair in pairs:
        s_prod, s_cons = _pair_scales(view, pair, alpha)
        scales[pair.producer] = s_prod
        params, stats = {}, {}
        for c in pair.consumers:
            w = view.weight(c)
            params[f"{c}.weight"] = (w.float() * s_cons[None, :]).to(w.dtype)
            if c in view.stats:
                stats[c] = scale_stats(view.stats[c], s_cons)
        if pair.is_norm:
            key = f"{pair.producer}.weight"
            g = view.params.get(key)
            if g is None:  # a weightless RMSNorm gains one: 1 / s
                g = torch.ones_like(s_prod, dtype=view.weight(pair.consumers[0]).dtype)
            params[key] = (g.float() / s_prod).to(g.dtype)
        else:
            w = view.weight(pair.producer)
            params[f"{pair.producer}.weight"] = (w.float() / s_prod[:, None]).to(w.dtype)
            b = view.bias(pair.producer)
            if b is not None:
                params[f"{pair.producer}.bias"] = (b.float() / s_prod).to(b.dtype)
        view = view.with_params(params).with_stats(stats)
    return view, scales


def _fq_weight(view: BlockView, name: str) -> torch.Tensor:
    spec = view.specs.get(name)
    if spec is None or spec.weight is None:
        return view.weight(name)
    scale, zero_point = spec.weight_qparams or (None, None)
    return fake_quantize(view.weight(name), spec.weight, scale=scale, zero_point=zero_point)


def _block_error(view: BlockView, reference: torch.Tensor) -> float:
    """MSE between the float block output and the block with RTN weights and quantized inputs."""
    params = dict(view.params)
    acts = {}
    for name in view.targets:
        params[f"{name}.weight"] = _fq_weight(view, name)
        spec = view.specs.get(name)
        if spec is not None and spec.activation is not None:
            acts[name] = spec.activation
    online = view.online_hadamard
    with torch.no_grad():
        out = block_forward(params, view.structure, view.inputs, act_specs=acts, online_hadamard=online)
    return mse(reference, out)


def _consumer_error(before: BlockView, after: BlockView, pairs: list[_Pair]) -> float:
    """Sum over the pairs' consumers of the MSE between ``X W^T`` (float) and
    ``fq(X') fq(W')^T`` on the stats' token sample (biases cancel)."""
    total = 0.0
    for pair in pairs:
        for c in pair.consumers:
            x, x_new = before.stats[c].tokens, after.stats[c].tokens
            if x is None:
                fail(NAME, before, c, "search=True needs block inputs (view.inputs) or a token sample "
                     "(stats tokens) to score alphas", "calibrate with inputs or tokens, or set search=False")
            act = after.specs[c].activation
            ref = x.float() @ before.weight(c).float().T
            out = fake_quantize(x_new.float(), act) @ _fq_weight(after, c).float().T
            total += mse(ref, out)
    return total


@register_transform(NAME, reads=lambda search, **_: {"activations"} | ({"block_inputs"} if search else set()))
def smoothquant(alpha: float = 0.5, search: bool = False, grid: list | tuple = DEFAULT_GRID,
                pairs: str = "norms") -> QTransform:
    """SmoothQuant on the target linears (module docstring has the math).

    alpha:  migration strength in [0, 1] (used when ``search=False``).
    search: pick alpha per block from ``grid`` by the *block output error*: for each candidate,
            smooth, round the targets' weights to their weight specs (RTN, or their fixed
            ``weight_qparams``), fake-quantize the targets' inputs with their activation specs, run
            `block_forward` on ``view.inputs`` and take the MSE against the float block on the same
            inputs; the first minimum wins. Without ``view.inputs`` it falls back to the sum of the
            smoothed consumers' output errors on their stats token samples (a per-layer proxy that
            ignores attention and the error's propagation through the block).
    grid:   candidate alphas, each in [0, 1].
    pairs:  ``"norms"`` (RMSNorm -> q/k/v and -> gate/up) or ``"all"`` (also v -> o, up -> down).

    A pair is smoothed when all its consumers are targets. Producers are rescaled even when they
    are not targets (the inverse scale must go somewhere), so run this before weight rounders.
    """
    check_range(NAME, "alpha", alpha, 0, 1)
    check_flags(NAME, search=search)
    if not isinstance(grid, (list, tuple)) or not grid:
        refuse(NAME, "grid", grid, "a non-empty list of numbers in [0, 1]")
    for i, a in enumerate(grid):
        check_range(NAME, f"grid[{i}]", a, 0, 1)
    check_choice(NAME, "pairs", pairs, PAIR_MODES)
    candidates = tuple(float(a) for a in grid)

    def init(view: BlockView) -> SmoothState:
        return SmoothState({}, float(alpha), ())

    def update(view: BlockView, state: SmoothState):
        active = _pairs(view, pairs)
        if not active:
            return view, state
        _check(view, active)
        chosen, errors = float(alpha), ()
        if search:
            if view.inputs is not None:
                with torch.no_grad():
                    reference = block_forward(view.params, view.structure, view.inputs,
                                              online_hadamard=view.online_hadamard)
                score = lambda a: _block_error(smooth(view, active, a)[0], reference)  # noqa: E731
            else:
                score = lambda a: _consumer_error(view, smooth(view, active, a)[0], active)  # noqa: E731
            errors = tuple(score(a) for a in candidates)
            ranked = [e if e == e else float("inf") for e in errors]  # NaN never wins
            chosen = candidates[ranked.index(min(ranked))]
        new_view, scales = smooth(view, active, chosen)
        return new_view, SmoothState({**state.scales, **scales}, chosen, errors)

    return QTransform(init, update)
