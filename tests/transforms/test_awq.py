"""AWQ: float-exact scaling (biases, GQA, q/k norms), consistent stats, never worse than RTN on its objective."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qnpu.qcore import QSpec, choose_qparams, fake_quantize
from qnpu.testing import activations, block_views, random_block
from qnpu.transforms import (
    chain,
    masked,
    quant_specs,
    recipe_from_dict,
    recipe_to_dict,
    rtn,
    state_from_dict,
    state_to_dict,
)
from qnpu.transforms.block import block_forward
from qnpu.transforms.stats import block_stats
from qnpu.transforms.awq import AWQState, awq, clip_search, pair_score
from qnpu.transforms.scale_search import candidate_ratios
from qnpu.transforms.view import TransformError

W3 = QSpec(bits=3)
W3_ASYM = QSpec(bits=3, format="uint", symmetric=False)
W3_GROUP = QSpec(bits=3, granularity="group", axis=-1, group_size=16)
SPECS = st.sampled_from([W3, W3_ASYM, W3_GROUP, QSpec(bits=4, granularity="tensor")])


def _run(t, view):
    return t.update(view, t.init(view))


def _awq(view, spec=W3, **kwargs):
    out, cs = _run(chain(quant_specs(weight=spec), awq(**kwargs)), view)
    return out, cs.states[1]


def column_scales(view, state: AWQState) -> dict:
    """Each consumer's input-column scale implied by the state, with the GQA expansion written out
    independently: o's column (h, d) takes v's channel (h // group, d)."""
    s = view.structure
    ones = {c: torch.ones(view.weight(c).shape[1]) for c in s.linears}
    out = dict(ones)
    for norm, consumers in s.norm_pairs:
        for c in consumers:
            out[c] = state.scales.get(norm, ones[c])
    if s.v in state.scales:
        group, hd, sv = s.num_heads // s.num_kv_heads, s.head_dim, state.scales[s.v]
        out[s.o] = torch.cat([sv[(h // group) * hd:(h // group + 1) * hd] for h in range(s.num_heads)])
    if s.up in state.scales:
        out[s.down] = state.scales[s.up]
    return out


@given(block_views(), SPECS, st.booleans())
@settings(max_examples=15)
def test_scaling_leaves_the_float_block_unchanged(view, spec, clip):
    out, state = _awq(view, spec, grid=5, clip=clip, clip_grid=4)
    assert set(state.scales) == {"input_layernorm", "post_attention_layernorm", "self_attn.v_proj", "mlp.up_proj"}
    ref = block_forward(view.params, view.structure, view.inputs)
    got = block_forward(out.params, out.structure, view.inputs)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    for k, v in view.params.items():
        assert out.params[k].shape == v.shape and out.params[k].dtype == v.dtype


@given(block_views(), SPECS)
@settings(max_examples=10)
def test_rescaled_stats_match_recalibration(view, spec):
    out, state = _awq(view, spec, grid=5, clip=False)
    fresh = block_stats(out.params, out.structure, view.inputs)
    sc = column_scales(view, state)
    for name in view.structure.linears:
        new, want, old = out.stats[name], fresh[name], view.stats[name]
        scale = float(want.absmax.max())
        torch.testing.assert_close(new.tokens, want.tokens, rtol=1e-4, atol=1e-5 * scale)
        torch.testing.assert_close(new.absmax, want.absmax, rtol=1e-4, atol=1e-5 * scale)
        torch.testing.assert_close(new.hessian, want.hessian, rtol=1e-3, atol=1e-5 * scale ** 2)
        torch.testing.assert_close(new.tokens * sc[name], old.tokens, rtol=1e-5, atol=1e-6 * scale)


def test_gptaq_stats_are_rescaled_too():
    view = random_block(11, num_heads=4, num_kv_heads=1, bias=True)
    fp_params = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1))
                 for k, v in view.params.items()}
    view = view._replace(stats=block_stats(view.params, view.structure, view.inputs, fp_params=fp_params))
    out, state = _awq(view, grid=4, clip=False)
    sc = column_scales(view, state)
    for name in view.structure.linears:
        old, new, s = view.stats[name], out.stats[name], sc[name]
        torch.testing.assert_close(new.fp_tokens * s, old.fp_tokens, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(new.fp_cross * s[:, None] * s[None, :], old.fp_cross, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(new.hessian * s[:, None] * s[None, :], old.hessian, rtol=1e-4, atol=1e-6)


def pair_errors(view, awq_view, rtn_view, state, max_tokens=256):
    """Per pair, ``sum_c ||X W_c^T - (X / s_c) W^q_c^T r_c||^2`` for AWQ (``r_c`` undoes the output-row
    scaling of a producer linear) and ``sum_c ||X W_c^T - X Q(W_c)^T||^2`` for plain RTN, in float64."""
    s, sc = view.structure, column_scales(view, state)
    rows = {p: state.scales[p] for p, _ in s.linear_pairs if p in state.scales}
    for producer, consumers in s.norm_pairs + s.linear_pairs:
        e_awq = e_rtn = 0.0
        for c in consumers:
            x = view.stats[c].tokens[:max_tokens].double()
            ref = x @ view.weight(c).double().T
            got = (x / sc[c].double()) @ awq_view.weight(c).double().T * rows.get(c, torch.ones(1)).double()
            e_awq += float((ref - got).square().sum())
            e_rtn += float((ref - x @ rtn_view.weight(c).double().T).square().sum())
        yield producer, e_awq, e_rtn


@given(block_views(), st.sampled_from([(W3, True), (W3, False), (W3_ASYM, True), (W3_GROUP, False)]))
@settings(max_examples=12)
def test_never_worse_than_rtn_on_the_searched_objective(view, spec_clip):
    # score="layers" searches each pair by its consumers' own outputs (the module score: below).
    # Per-channel and per-group (along the input) grids commute with the producer's row scaling,
    # so each pair's objective after the whole chain is what its search measured.
    spec, clip = spec_clip
    a, state = _run(chain(quant_specs(weight=spec), awq(grid=8, clip=clip, clip_grid=8, score="layers"), rtn()), view)
    r, _ = _run(chain(quant_specs(weight=spec), rtn()), view)
    for producer, e_awq, e_rtn in pair_errors(view, a, r, state.states[1]):
        assert e_awq <= e_rtn * (1 + 1e-4), f"{producer}: AWQ {e_awq:.6g} > RTN {e_rtn:.6g}"


def test_awq_improves_on_rtn_with_outlier_channels():
    view = random_block(0)
    a, state = _run(chain(quant_specs(weight=W3), awq(), rtn()), view)
    r, _ = _run(chain(quant_specs(weight=W3), rtn()), view)
    errors = list(pair_errors(view, a, r, state.states[1]))
    assert sum(e for _, e, _ in errors) < 0.7 * sum(e for _, _, e in errors)
    assert any(alpha > 0 for alpha in state.states[1].alphas.values())


@given(activations(tokens=st.integers(4, 32), channels=st.just(32)), st.integers(0, 2**31 - 1), SPECS)
def test_clip_search_never_worse_than_minmax_on_output_error(x, seed, spec):
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(seed))
    scale, zp, ratio = clip_search(w, x, spec, candidate_ratios(10, 0.5))
    s0, z0 = choose_qparams(w, spec)

    def err(s, z):
        return float((x.double() @ (w - fake_quantize(w, spec, scale=s, zero_point=z)).double().T).square().sum())

    if spec.granularity != "group":  # per-group clipping scores partial outputs (AWQ's proxy)
        assert err(scale, zp) <= err(s0, z0) * (1 + 1e-5) + 1e-12
    assert scale.shape == s0.shape == ratio.shape and bool(((ratio >= 0.5) & (ratio <= 1)).all())


def test_rtn_rounds_with_the_clipped_qparams():
    view = random_block(2, num_kv_heads=1)
    clipped, _ = _awq(view, W3_ASYM, grid=4, clip_qk=True)
    _, rs = _run(rtn(), clipped)
    for name, q in rs.qweights.items():
        scale, zp = clipped.specs[name].weight_qparams
        assert torch.equal(q.scale, scale) and torch.equal(q.zero_point, zp)


@pytest.mark.parametrize("clip_qk", [False, True])
def test_q_and_k_are_not_clipped_unless_asked(clip_qk):
    view = random_block(8)
    s = view.structure
    out, state = _awq(view, W3_GROUP, grid=3, clip_grid=6, clip_qk=clip_qk)
    clipped = {s.v, s.o, s.gate, s.up, s.down} | ({s.q, s.k} if clip_qk else set())
    assert set(state.clip_ratios) == clipped
    for name in s.linears:
        assert (out.specs[name].weight_qparams is not None) == (name in clipped), name


# -- the objectives, computed independently ---------------------------------------------------------
def rounded_scaled(w, s, spec):
    """``Q(W diag(s)) diag(1/s)``: the scaled, rounded weight with the scale moved back to the input."""
    return fake_quantize(w * s, spec) / s


def attention_out(params, structure, x):
    """The self-attention output on block inputs ``x``: the block with a zero MLP minus its input
    (`block_forward` is checked against transformers' LlamaDecoderLayer in test_block.py)."""
    p = dict(params)
    p[f"{structure.down}.weight"] = torch.zeros_like(p[f"{structure.down}.weight"])
    p.pop(f"{structure.down}.bias", None)
    return block_forward(p, structure, x) - x


def mlp_out(params, structure, rows):
    lin = lambda n, v: torch.nn.functional.linear(v, params[f"{n}.weight"], params.get(f"{n}.bias"))  # noqa: E731
    return lin(structure.down, torch.nn.functional.silu(lin(structure.gate, rows)) * lin(structure.up, rows))


def module_objective(view, norm, consumers, s_cols, spec, max_tokens=2048):
    """llm-awq's objective of a norm pair for column scales ``s_cols``: the whole module's output
    error with the consumers' weights replaced by their scaled, rounded versions."""
    st, params = view.structure, view.params
    new = {**params, **{f"{c}.weight": rounded_scaled(params[f"{c}.weight"], s_cols, spec) for c in consumers}}
    if norm == st.attn_norm:
        ref, got = attention_out(params, st, view.inputs), attention_out(new, st, view.inputs)
    else:
        rows = view.stats[st.gate].tokens[:max_tokens]
        ref, got = mlp_out(params, st, rows), mlp_out(new, st, rows)
    return float((ref.double() - got.double()).square().sum())


def salience(view, name, max_tokens=2048):
    """AWQ's salience statistic of a consumer's input channels: mean |x| over the token sample."""
    return view.stats[name].tokens[:max_tokens].abs().mean(0)


def normalized_power(m, alpha):
    s = m.pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


@given(block_views(), st.sampled_from([W3, W3_GROUP]), st.integers(0, 2**31 - 1))
@settings(max_examples=8)
def test_module_score_equals_the_attention_and_mlp_output_error(view, spec, seed):
    st_ = view.structure
    view, _ = _run(quant_specs(weight=spec), view)
    s_cols = torch.exp(0.5 * torch.randn(st_.hidden_size, generator=torch.Generator().manual_seed(seed)))
    for norm, consumers in st_.norm_pairs:
        score = pair_score(view, norm, consumers)
        want = module_objective(view, norm, consumers, s_cols, spec)
        assert score(s_cols) == pytest.approx(want, rel=2e-4), norm


@given(block_views(), st.sampled_from([W3, W3_GROUP]))
@settings(max_examples=8)
def test_norm_pairs_pick_the_alpha_minimizing_the_module_output_error(view, spec):
    grid = 5
    _, state = _awq(view, spec, grid=grid, clip=False, score="module")
    st_ = view.structure
    for norm, consumers in st_.norm_pairs:
        m = salience(view, consumers[0])
        errors = [module_objective(view, norm, consumers, normalized_power(m, i / grid), spec) for i in range(grid)]
        chosen = errors[round(state.alphas[norm] * grid)]
        assert chosen <= min(errors) * (1 + 1e-4), (norm, state.alphas[norm], errors)


@given(block_views(), SPECS)
@settings(max_examples=8)
def test_scales_follow_the_mean_absolute_activation(view, spec):
    """s = mean|x|^alpha normalized, for every pair; the statistic is the mean of |x| per input
    channel of the pair's consumers (o's columns averaged over the query heads sharing a kv head)."""
    _, state = _awq(view, spec, grid=5, clip=False)
    st_ = view.structure
    group, hd = st_.num_heads // st_.num_kv_heads, st_.head_dim
    stats = {st_.attn_norm: salience(view, st_.q), st_.mlp_norm: salience(view, st_.gate),
             st_.up: salience(view, st_.down),
             st_.v: salience(view, st_.o).view(st_.num_kv_heads, group, hd).mean(1).reshape(-1)}
    assert set(state.scales) == set(stats)
    for producer, m in stats.items():
        torch.testing.assert_close(state.scales[producer], normalized_power(m, state.alphas[producer]),
                                   rtol=1e-5, atol=0)


def test_outlier_blocks_choose_a_nonzero_alpha_so_the_statistic_matters():
    for seed in range(3):
        _, state = _awq(random_block(seed), W3, clip=False)
        assert all(state.alphas[p] > 0 for p in ("input_layernorm", "post_attention_layernorm")), state.alphas


def test_weightless_norm_pair_is_skipped():
    view = random_block(3, bias=True)
    view = view._replace(params={k: v for k, v in view.params.items() if k != "input_layernorm.weight"})
    out, state = _awq(view, grid=4, clip=False)
    assert "input_layernorm" not in state.scales and "self_attn.v_proj" in state.scales
    assert "input_layernorm.weight" not in out.params
    for name in ("self_attn.q_proj", "self_attn.k_proj"):
        assert out.params[f"{name}.weight"] is view.params[f"{name}.weight"]
    ref = block_forward(view.params, view.structure, view.inputs)
    torch.testing.assert_close(block_forward(out.params, out.structure, view.inputs), ref,
                               rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_only_pairs_whose_consumers_are_all_targets():
    view = random_block(4)
    out, cs = _run(chain(quant_specs(weight=W3), masked("*.mlp.*", awq(grid=4))), view)
    assert set(cs.states[1].scales) == {"post_attention_layernorm", "mlp.up_proj"}
    assert set(cs.states[1].clip_ratios) == {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    for k, v in view.params.items():
        if not k.startswith(("mlp.", "post_attention_layernorm")):
            assert out.params[k] is v


def test_no_input_mutation_determinism_and_round_trip():
    view = random_block(5, bias=True, qk_norm=True)
    params = {k: v.clone() for k, v in view.params.items()}
    tokens = {k: s.tokens.clone() for k, s in view.stats.items()}
    t = chain(quant_specs(weight=W3_GROUP), awq(grid=6, clip_grid=6))
    a, sa = _run(t, view)
    b, sb = _run(t, view)
    assert all(torch.equal(view.params[k], v) for k, v in params.items())
    assert all(torch.equal(view.stats[k].tokens, v) for k, v in tokens.items())
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    state = sa.states[1]
    assert state.alphas == sb.states[1].alphas
    back = state_from_dict(state_to_dict(state))
    assert isinstance(back, AWQState) and back.alphas == state.alphas
    for field in ("scales", "clip_ratios"):
        got, want = getattr(back, field), getattr(state, field)
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert recipe_to_dict(recipe_from_dict(recipe_to_dict(awq(grid=7)))) == recipe_to_dict(awq(grid=7))


def test_errors_name_awq_the_layer_and_the_fix():
    view = random_block(6)
    with pytest.raises(TransformError, match=r"awq: layer model\.layers\.0\.self_attn\.q_proj.*quant_specs"):
        _run(awq(), view)
    no_v = chain(quant_specs(weight=W3), masked("*.v_proj", quant_specs(weight=None)), awq())
    with pytest.raises(TransformError, match=r"awq: layer model\.layers\.0\.self_attn\.v_proj.*"
                                             r"quant_specs\(weight=QSpec\(\.\.\.\)\) before awq"):
        _run(no_v, view)
    no_tokens = view.with_stats({n: s._replace(tokens=None) for n, s in view.stats.items()})
    with pytest.raises(TransformError, match=r"awq: layer .*calibrat"):
        _awq(no_tokens)
    no_inputs = view._replace(inputs=None)
    with pytest.raises(TransformError, match=r"awq: layer model\.layers\.0\.self_attn\.q_proj: .*view\.inputs is None.*"
                                             r"score='layers'"):
        _awq(no_inputs, score="module")
    _awq(no_inputs, score="layers", grid=2, clip=False)  # reads no block inputs


@pytest.mark.parametrize("kwargs", [
    {"grid": 0}, {"grid": 2.0}, {"grid": True}, {"clip": 1}, {"clip_grid": 1}, {"min_clip": 0},
    {"min_clip": 1.5}, {"min_clip": "0.5"}, {"max_tokens": 0}, {"max_tokens": None}, {"score": "block"},
    {"clip_qk": 1},
])
def test_bad_arguments_raise_value_error(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        awq(**kwargs)


def test_nan_weight_names_the_layer():
    view = random_block(7)
    bad = view.with_params({"mlp.down_proj.weight": torch.full_like(view.weight("mlp.down_proj"), float("inf"))})
    with pytest.raises(TransformError, match=r"awq: layer model\.layers\.0\.mlp\.down_proj: .*Inf"):
        _awq(bad)


def test_pairs_behind_an_online_hadamard_are_skipped_so_the_float_block_is_unchanged():
    """awq after hadamard_rotation(online=True): folding up->down through the online H changed the
    block output by 12-44% before any rounding; the pair must be left alone."""
    from qnpu.transforms import chain, hadamard_rotation, quant_specs
    view = random_block(3)
    rotated, _ = (r := chain(quant_specs(weight=QSpec(bits=4)), hadamard_rotation(seed=0))).update(view, r.init(view))
    assert rotated.online_hadamard
    ref = block_forward(rotated.params, rotated.structure, view.inputs, online_hadamard=rotated.online_hadamard)
    t = awq(clip=False)
    out, state = t.update(rotated, t.init(rotated))
    got = block_forward(out.params, out.structure, view.inputs, online_hadamard=out.online_hadamard)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    down = [c for c in rotated.online_hadamard]
    assert all(not any(c in cs for p, cs in out.structure.linear_pairs if p in state.scales) for c in down)
