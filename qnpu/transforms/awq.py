"""AWQ: activation-aware weight quantization (Lin et al. 2023, "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration").

Salient input channels (large mean activation) lose less to rounding if their weight columns are
scaled up before quantization and the scale is undone on the activation side, where it folds
into the producer of that activation for free::

    X W^T = (X diag(1/s)) (W diag(s))^T,   s_j = mean_n |X[n, j]|^alpha / sqrt(max(s^a) min(s^a))

The salience statistic is the mean magnitude of each input channel over the calibration tokens,
``mean_n |X[n, j]|`` (the paper's Sec. 3.2; not the max, not the weight's magnitude). Per
smoothing pair (producer -> consumers) of the block, ``alpha`` is chosen on a grid in ``[0, 1)``
by an output error with round-to-nearest under each consumer's weight spec. With
``score="module"`` (the default, as the reference implementation llm-awq scores its scales) the
norm pairs are scored by the whole module that reads them: q/k/v by the self-attention output
(q/k/v replaced by ``Q(W_c diag(s)) diag(1/s)``, o in float, on the block's input sequences
``view.inputs`` through the RMSNorm, RoPE and causal attention; `attention_output`) and gate/up by
the MLP output (down in float, on gate's token sample; `mlp_output`)::

    E(alpha) = || M(X) - M_s(X) ||_F^2      (M the float module, M_s with the scaled, rounded consumers)

so the attention scores and the SiLU gating weigh each consumer's error by what reaches the
residual stream. The linear pairs, and every pair with ``score="layers"``, use the consumers'
own output errors on their tokens::

    E(alpha) = sum_c || X W_c^T - (X / s) Q(W_c diag(s))^T ||_F^2

``alpha = 0`` gives ``s = 1``, plain RTN, so the chosen ``E`` is never above RTN's. The best
``s`` is folded: consumer columns ``W_c <- W_c diag(s)``; the producer is divided by ``s``, an
RMSNorm weight ``g <- g / s`` or a linear's output rows and bias ``W_p <- diag(1/s) W_p``. In
float the block computes exactly the same function (up to rounding).

Pairs: ``structure.norm_pairs`` (RMSNorm -> q, k, v and -> gate, up) and
``structure.linear_pairs`` (v -> o, exact because attention mixes v linearly over tokens per
channel; up -> down, exact because ``silu(gate) * up`` is linear in ``up``). With grouped-query
attention, o's input column ``(h, d)`` reads kv head ``h // (num_heads / num_kv_heads)``, so the
search runs over v's ``num_kv_heads * head_dim`` output channels and each ``s[(c, d)]`` scales
every o column ``(h, d)`` with ``h // group == c``.

Then (``clip=True``, AWQ's weight clipping) each quantizable target gets, per slice (output row
or group), the clip ratio minimizing its output error on the tokens, stored as ``weight_qparams``
for the rounder that follows (`rtn`, `gptq`), q and k included. llm-awq leaves q and k unclipped
(their own output error is not what attention sees); ``clip_qk=False`` does that. On the default
model at W4 per channel (``benchmarks/results/awq_score.md``, one calibration seed) the module
score lowered docs / code perplexity from 20.24 / 10.52 to 19.72 / 10.19 and leaving q/k unclipped
raised it to 20.48 / 11.26, hence the defaults ``score="module"``, ``clip_qk=True``.
"""
from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

import torch

from qnpu.qcore import QSpec, fake_quantize

from .base import QTransform, register_state, register_transform
from .block import attention_output, mlp_output, rms_norm
from .checks import check_choice, check_flags, check_int, check_range
from .rounder import checked_weight, quantizable
from .scale_search import (
    CHUNK_ELEMENTS,
    candidate_ratios,
    clip_qparams,
    compute_dtype,
    fake_quantize_candidates,
    pick,
)
from .stats import scale_stats
from .view import BlockStructure, BlockView, fail


@register_state
class AWQState(NamedTuple):
    """scales: producer name -> ``s`` over the producer's output channels (the pair's key);
    alphas: producer name -> chosen ``alpha``; clip_ratios: linear name -> clip ratio per slice."""

    scales: dict
    alphas: dict
    clip_ratios: dict


# -- pure core ----------------------------------------------------------------------------------
def activation_scales(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = x_mean^alpha`` (floored at 1e-4), divided by ``sqrt(max(s) min(s))`` so that the
    scales straddle 1; ``alpha = 0`` gives exactly ones."""
    s = x_mean.pow(alpha).clamp(min=1e-4)
    return s / torch.sqrt(s.max() * s.min())


def scaled_output_error(w: torch.Tensor, x: torch.Tensor, s: torch.Tensor, spec: QSpec,
                        ref: torch.Tensor | None = None) -> torch.Tensor:
    """``||X W^T - (X / s) Q(W diag(s))^T||_F^2`` with ``Q`` round-to-nearest under ``spec``
    (``w [out, in]``, ``x [m, in]``, ``s [in]``; ``ref = X W^T`` if precomputed)."""
    ref = x @ w.T if ref is None else ref
    q = fake_quantize(w * s, spec)
    return (ref - (x / s) @ q.T).square().sum()


def layer_score(consumers: list[tuple[torch.Tensor, torch.Tensor, QSpec]]) -> Callable[[torch.Tensor], float]:
    """``sc -> sum_c scaled_output_error(w_c, x_c, sc, spec_c)`` over the ``(w, x, spec)`` consumers
    (``sc`` over their input columns)."""
    refs = [x @ w.T for w, x, _ in consumers]
    return lambda sc: sum(float(scaled_output_error(w, x, sc, spec, ref)) for (w, x, spec), ref in zip(consumers, refs))


def module_score(module: Callable[[Mapping[str, torch.Tensor]], torch.Tensor], params: Mapping[str, torch.Tensor],
                 consumers: list[tuple[str, QSpec]]) -> Callable[[torch.Tensor], float]:
    """``sc -> ||module(params) - module(params_s)||_F^2`` with ``params_s`` holding each consumer's
    weight as ``Q(W diag(sc)) diag(1/sc)`` (its scaled, rounded weight with the scale undone on
    the input side, the same product as ``(X / sc) Q(W diag(sc))^T``); ``module`` maps params to
    the module's output on fixed inputs (`attention_output`, `mlp_output`)."""
    ref = module(params)

    def score(sc: torch.Tensor) -> float:
        scaled = {f"{c}.weight": fake_quantize(params[f"{c}.weight"] * sc, spec) / sc for c, spec in consumers}
        return float((ref - module({**params, **scaled})).square().sum())

    return score


def search_scales(x_mean: torch.Tensor, score: Callable[[torch.Tensor], float],
                  expand: Callable[[torch.Tensor], torch.Tensor], grid: int) -> tuple[torch.Tensor, float, float]:
    """AWQ's alpha grid search: ``alpha in {0, 1/grid, ..., (grid-1)/grid}``, ``s = activation_scales``
    over the producer's channels and ``score(expand(s))`` (`layer_score`, `module_score`) with
    ``expand`` onto the consumers' input columns. Returns ``(s, alpha, error)``; on ties the
    smaller alpha wins."""
    best = None
    for i in range(grid):
        alpha = i / grid
        s = activation_scales(x_mean, alpha)
        err = score(expand(s))
        if best is None or err < best[2]:
            best = (s, alpha, err)
    return best


def output_slice_errors(d: torch.Tensor, x: torch.Tensor, spec: QSpec) -> torch.Tensor:
    """Output error of weight errors ``d [C, out, in]`` on tokens ``x [m, in]`` per slice ``[C, *P]``:
    per tensor ``||X D^T||^2``, per channel ``||X d_o||^2``, per group the error of the group's
    partial output ``||X_g d_{o,g}||^2`` (AWQ's per-group clipping objective)."""
    if spec.granularity == "group":
        n = d.shape[-1] // spec.group_size
        partial = torch.einsum("cong,mng->conm", d.unflatten(-1, (n, spec.group_size)),
                               x.unflatten(-1, (n, spec.group_size)))
        return partial.square().sum(-1)
    out = (d @ x.T).square()
    return out.sum((1, 2)) if spec.granularity == "tensor" else out.sum(-1, keepdim=True)


def clip_search(w: torch.Tensor, x: torch.Tensor, spec: QSpec, ratios: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per slice, the clip ratio in ``ratios`` (last = 1, the spec's own range) minimizing
    `output_slice_errors`; returns ``(scale, zero_point, ratio)`` in the natural shape."""
    out, k = w.shape
    groups = k // spec.group_size if spec.granularity == "group" else 1
    step = max(1, CHUNK_ELEMENTS // max(out * k, out * groups * x.shape[0]))
    errors, scales, zps = [], [], []
    for start in range(0, len(ratios), step):
        scale, zp = clip_qparams(w, spec, ratios[start:start + step])
        d = w - fake_quantize_candidates(w, spec, scale, zp)
        errors.append(output_slice_errors(d, x, spec))
        scales.append(scale)
        zps.append(zp)
    scale = torch.cat(scales)
    r = ratios.to(scale.dtype).reshape(-1, *([1] * (scale.ndim - 1))).expand_as(scale)
    return pick(torch.cat(errors), (scale, None if zps[0] is None else torch.cat(zps), r))


# -- wiring -------------------------------------------------------------------------------------
def _channel_maps(view: BlockView, producer: str, n_producer: int, n_consumer: int):
    """``(expand, collapse)`` between the producer's output channels and the consumers' inputs."""
    st: BlockStructure = view.structure
    if n_producer == n_consumer:
        return (lambda s: s), (lambda v: v)
    group = st.num_heads // st.num_kv_heads
    if producer == st.v and n_producer == st.num_kv_heads * st.head_dim and n_consumer == n_producer * group:
        kv, hd = st.num_kv_heads, st.head_dim
        return (lambda s: s.view(kv, 1, hd).expand(kv, group, hd).reshape(-1),
                lambda v: v.view(kv, group, hd).mean(1).reshape(-1))
    fail("awq", view, producer, f"its {n_producer} output channels do not map onto the consumers' "
         f"{n_consumer} input channels", "check the BlockStructure (heads, head_dim) of this model")


def _tokens(view: BlockView, stats: dict, name: str, max_tokens: int) -> torch.Tensor:
    st = stats.get(name)
    if st is None or st.tokens is None:
        fail("awq", view, name, "no calibration tokens in view.stats",
             "calibrate the block (block_stats / the model calibration engine) before awq")
    return st.tokens[:max_tokens]


def _module_params(view: BlockView, names, cdt) -> dict:
    keys = [f"{n}.{kind}" for n in names if n for kind in ("weight", "bias")]
    return {k: view.params[k].to(cdt) for k in keys if k in view.params}


def pair_score(view: BlockView, producer: str, consumers: tuple[str, ...], *, score: str = "module",
               max_tokens: int = 2048) -> Callable[[torch.Tensor], float]:
    """The objective of one pair's alpha search on ``view`` (module docstring), as a function of the
    consumers' input-column scales: with ``score="module"`` the self-attention output error for the
    attention norm's pair (``view.inputs``, ``max_tokens // seq_len`` sequences, at least one) and
    the MLP output error for the MLP norm's (gate's first ``max_tokens`` token rows); otherwise, and
    for the linear pairs, the consumers' own output errors on their first ``max_tokens`` token rows."""
    st = view.structure
    cdt = compute_dtype(view.weight(consumers[0]))
    specs = [(c, view.specs[c].weight) for c in consumers]
    xs = [_tokens(view, view.stats, c, max_tokens).to(cdt) for c in consumers]
    if score == "module" and producer == st.attn_norm:
        if view.inputs is None:
            fail("awq", view, consumers[0], "score='module' scores q/k/v by the self-attention output on the "
                 "block's input sequences, and view.inputs is None", "calibrate with block inputs "
                 "(make_view(inputs=...) / the calibration engine), or use awq(score='layers')")
        x = view.inputs[: max(1, max_tokens // view.inputs.shape[1])].to(cdt)
        n1 = rms_norm(x, view.params[f"{producer}.weight"].to(cdt), st.norm_eps)
        names = (st.q, st.k, st.v, st.o, st.q_norm, st.k_norm)
        return module_score(lambda p: attention_output(p, st, n1, online_hadamard=view.online_hadamard),
                            _module_params(view, names, cdt), specs)
    if score == "module" and producer == st.mlp_norm:
        return module_score(lambda p: mlp_output(p, st, xs[0], online_hadamard=view.online_hadamard),
                            _module_params(view, (st.gate, st.up, st.down), cdt), specs)
    return layer_score([(view.weight(c).to(cdt), x, spec) for (c, spec), x in zip(specs, xs)])


SCORES = ("module", "layers")


def _reads(score: str, **_) -> set:
    return {"activations"} | ({"block_inputs"} if score == "module" else set())


@register_transform("awq", reads=_reads)
def awq(grid: int = 20, clip: bool = True, clip_grid: int = 20, min_clip: float = 0.5,
        max_tokens: int = 2048, score: str = "module", clip_qk: bool = True) -> QTransform:
    """AWQ scaling (and clipping) of the block's smoothing pairs; see the module docstring.

    A pair is processed when all its consumers are targets and none of them reads its input through
    an online Hadamard (QuaRot's before down_proj: a per-channel scale does not commute with it, so
    the pair is skipped); each consumer must have a weight spec
    (TransformError otherwise). The producer is changed even when it is not a target (it stays
    in float terms the same function). A pair whose RMSNorm has no weight in ``params`` is skipped
    (creating one would add a parameter the model does not have). Consumers' stats are rescaled to
    match their new inputs (`scale_stats`). ``grid``: number of alphas; ``clip_grid`` ratios in
    ``[min_clip, 1]``; ``max_tokens``: token rows used by both searches (and the block input
    sequences, ``max_tokens // seq_len`` of them, at least one, for the attention score).
    ``score``: ``"module"`` (norm pairs scored by the attention / MLP output, as llm-awq) or
    ``"layers"`` (every pair by its consumers' own outputs; reads no block inputs).

    Clipping covers every target with a uniform weight spec (``clip_qk=False``: all but q and k,
    as llm-awq). Binary specs are not clipped.
    """
    check_int("awq", "grid", grid)
    check_int("awq", "clip_grid", clip_grid, 2)
    check_int("awq", "max_tokens", max_tokens)
    check_flags("awq", clip=clip)
    check_range("awq", "min_clip", min_clip, 0, 1, open_lo=True)
    check_choice("awq", "score", score, SCORES)
    check_flags("awq", clip_qk=clip_qk)

    def update(view: BlockView, state: AWQState):
        quantizable(view, "awq")  # a recipe without weight specs is wrong: say so first
        st = view.structure
        params, stats = {}, dict(view.stats)
        scales, alphas = dict(state.scales), dict(state.alphas)

        def param(key):
            return params.get(key, view.params.get(key))

        pairs = [(p, cs, True) for p, cs in st.norm_pairs] + [(p, cs, False) for p, cs in st.linear_pairs]
        for producer, consumers, is_norm in pairs:
            if not all(c in view.targets for c in consumers):
                continue
            if any(c in view.online_hadamard for c in consumers):
                continue  # a channel scale does not commute with the online Hadamard before the consumer
            for c in consumers:
                if view.specs.get(c) is None or view.specs[c].weight is None:
                    fail("awq", view, c, "no weight spec is set, so AWQ cannot search its scales",
                         "put quant_specs(weight=QSpec(...)) before awq() in the chain")
                checked_weight(view, c, "awq")
            p_key = f"{producer}.weight"
            if param(p_key) is None:
                continue  # weightless RMSNorm: nothing to fold 1/s into
            ws = [param(f"{c}.weight") for c in consumers]
            cdt = compute_dtype(ws[0])
            xs = [_tokens(view, stats, c, max_tokens).to(cdt) for c in consumers]
            n_prod = param(p_key).shape[0]
            expand, collapse = _channel_maps(view, producer, n_prod, ws[0].shape[1])
            x_mean = collapse(xs[0].abs().mean(0))  # the salience statistic: mean |x| per channel
            objective = pair_score(view.with_params(params).with_stats(stats), producer, consumers, score=score,
                                   max_tokens=max_tokens)
            s, alpha, _ = search_scales(x_mean, objective, expand, grid)
            sc = expand(s)
            for c, w in zip(consumers, ws):
                params[f"{c}.weight"] = (w.to(cdt) * sc).to(w.dtype)
                stats[c] = scale_stats(stats[c], sc)
            g = param(p_key)
            params[p_key] = (g.to(cdt) / s if is_norm else g.to(cdt) / s[:, None]).to(g.dtype)
            b = None if is_norm else param(f"{producer}.bias")
            if b is not None:
                params[f"{producer}.bias"] = (b.to(cdt) / s).to(b.dtype)
            scales[producer], alphas[producer] = s, alpha

        view = view.with_params(params).with_stats(stats)
        clip_ratios = dict(state.clip_ratios)
        if clip:
            ratios = candidate_ratios(clip_grid, float(min_clip), device=view.weight(st.q).device)
            specs = {}
            for name, spec in quantizable(view, "awq"):
                if spec.format == "binary" or (not clip_qk and name in (st.q, st.k)):
                    continue  # sign codes have no range to clip; q/k: module docstring
                if (spec.granularity == "channel" and spec.axis not in (0, -2)) or \
                        (spec.granularity == "group" and spec.axis not in (1, -1)):
                    fail("awq", view, name, f"clipping needs a per-channel (axis=0) or per-group (axis=-1) "
                         f"weight spec; got {spec.granularity} axis={spec.axis}",
                         "set the weight spec with quant_specs, or use awq(clip=False)")
                w = view.weight(name)
                cdt = compute_dtype(w)
                scale, zp, r = clip_search(w.to(cdt), _tokens(view, view.stats, name, max_tokens).to(cdt),
                                           spec, ratios)
                specs[name] = view.specs[name]._replace(weight_qparams=(scale, zp))
                clip_ratios[name] = r * float(spec.clip_ratio)
            view = view.with_specs(specs)
        return view, AWQState(scales, alphas, clip_ratios)

    return QTransform(lambda view: AWQState({}, {}, {}), update)

