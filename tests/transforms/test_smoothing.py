"""SmoothQuant: the float block is unchanged, stats follow the new inputs, the balance of
alpha=0.5 holds, the alpha search is no worse than a fixed alpha, and bad recipes fail clearly."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qnpu.qcore import QSpec, fake_quantize, mse
from qnpu.testing import block_views, random_block
from qnpu.transforms import (
    TransformError,
    chain,
    masked,
    quant_specs,
    recipe_from_dict,
    recipe_to_dict,
    state_from_dict,
    state_to_dict,
)
from qnpu.transforms.block import block_forward
from qnpu.transforms.stats import block_stats
from qnpu.transforms.smoothing import DEFAULT_GRID, PAIR_MODES, SmoothState, smoothquant

W8, W4 = QSpec(bits=8), QSpec(bits=4)
A8 = QSpec(bits=8, granularity="token", dynamic=True)
A8_STATIC = QSpec(bits=8, granularity="tensor")
alphas = st.floats(0.0, 1.0, allow_nan=False)


def run(view, weight=W8, activation=A8, **kwargs):
    """(new view, SmoothState) of quant_specs(...) then smoothquant(**kwargs)."""
    recipe = chain(quant_specs(weight=weight, activation=activation), smoothquant(**kwargs))
    new, state = recipe.update(view, recipe.init(view))
    return new, state.states[-1]


def output(view, inputs=None):
    with torch.no_grad():
        return block_forward(view.params, view.structure, view.inputs if inputs is None else inputs)


def relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


def quantized_block_error(view, reference) -> float:
    """Block output MSE with every target's weight RTN-rounded and input fake-quantized."""
    params = dict(view.params)
    acts = {}
    for name in view.targets:
        spec = view.specs[name]
        params[f"{name}.weight"] = fake_quantize(view.weight(name), spec.weight)
        acts[name] = spec.activation
    with torch.no_grad():
        return mse(reference, block_forward(params, view.structure, view.inputs, act_specs=acts))


def consumers(view, pairs):
    s = view.structure
    names = [s.q, s.k, s.v, s.gate, s.up]
    return names + ([s.o, s.down] if pairs == "all" else [])


@given(block_views(), alphas, st.sampled_from(PAIR_MODES))
def test_float_block_output_is_unchanged(view, alpha, pairs):
    new, state = run(view, alpha=alpha, pairs=pairs)
    assert relative(output(new), output(view)) < 1e-4
    s = view.structure
    expected = {s.attn_norm, s.mlp_norm} | ({s.v, s.up} if pairs == "all" else set())
    assert set(state.scales) == expected and state.alpha == alpha
    assert any(not torch.equal(new.weight(n), view.weight(n)) for n in consumers(view, pairs))


@given(block_views(), alphas, st.sampled_from(PAIR_MODES))
def test_stats_match_the_smoothed_block(view, alpha, pairs):
    new, _ = run(view, alpha=alpha, pairs=pairs)
    fresh = block_stats(new.params, new.structure, new.inputs)
    for name in consumers(view, pairs):
        for field in ("hessian", "absmax", "tokens"):
            got, want = getattr(new.stats[name], field), getattr(fresh[name], field)
            assert relative(got, want) < 1e-4, (name, field)


@settings(max_examples=10)
@given(block_views(), st.sampled_from(PAIR_MODES))
def test_half_alpha_balances_activation_and_weight_ranges(view, pairs):
    """SmoothQuant's alpha=0.5: after smoothing, max|X'_j| == max|W'_j| = sqrt(max|X_j| max|W_j|)
    (for v -> o, after the max over the query heads that share a kv head)."""
    new, _ = run(view, alpha=0.5, pairs=pairs)
    s = view.structure
    groups = [(s.q, s.k, s.v), (s.gate, s.up)] + ([(s.o,), (s.down,)] if pairs == "all" else [])
    for group in groups:
        act = new.stats[group[0]].absmax
        wmax = torch.stack([new.weight(n).abs().amax(0) for n in group]).amax(0)
        if group == (s.o,):
            shape = (s.num_kv_heads, s.num_heads // s.num_kv_heads, s.head_dim)
            act, wmax = act.reshape(shape).amax(1), wmax.reshape(shape).amax(1)
        torch.testing.assert_close(act, wmax, rtol=1e-4, atol=0)


def test_smoothing_flattens_the_outlier_channels():
    view = random_block(3)
    new, _ = run(view, alpha=0.5)
    for name in ("self_attn.q_proj", "mlp.up_proj"):
        before, after = view.stats[name].absmax, new.stats[name].absmax
        assert after.max() / after.median() < 0.5 * before.max() / before.median()


@settings(max_examples=8)
@given(block_views(), st.sampled_from(PAIR_MODES), st.sampled_from([A8, A8_STATIC]))
def test_search_is_no_worse_than_fixed_alpha(view, pairs, activation):
    assert 0.5 in DEFAULT_GRID
    reference = output(view)
    searched, state = run(view, weight=W4, activation=activation, search=True, pairs=pairs)
    fixed, _ = run(view, weight=W4, activation=activation, alpha=0.5, pairs=pairs)
    err_search, err_fixed = quantized_block_error(searched, reference), quantized_block_error(fixed, reference)
    assert err_search <= err_fixed * (1 + 1e-6)
    assert len(state.search_errors) == len(DEFAULT_GRID)
    assert state.alpha == DEFAULT_GRID[state.search_errors.index(min(state.search_errors))]
    assert state.search_errors[DEFAULT_GRID.index(0.5)] == pytest.approx(err_fixed, rel=1e-5)
    assert relative(output(searched), reference) < 1e-4


def test_search_ties_go_to_the_first_alpha():
    view = random_block(0)
    _, state = run(view, search=True, grid=[0.5, 0.5, 0.5])
    assert state.alpha == 0.5 and len(set(state.search_errors)) == 1
    _, state = run(view, search=True, grid=[0.9, 0.2])
    assert state.alpha == [0.9, 0.2][state.search_errors.index(min(state.search_errors))]


def test_search_without_block_inputs_scores_the_consumers():
    view = random_block(1, bias=True)._replace(inputs=None)
    new, state = run(view, weight=W4, search=True, pairs="all")
    assert len(state.search_errors) == len(DEFAULT_GRID)
    assert state.alpha == DEFAULT_GRID[state.search_errors.index(min(state.search_errors))]
    with_inputs = random_block(1, bias=True)
    assert relative(output(new, with_inputs.inputs), output(with_inputs)) < 1e-4
    no_tokens = view._replace(stats={n: s._replace(tokens=None) for n, s in view.stats.items()})
    with pytest.raises(TransformError, match="search=True needs block inputs"):
        run(no_tokens, search=True)


def test_weight_only_recipes_are_refused_with_the_fix():
    view = random_block(0, prefix="model.layers.4.")
    with pytest.raises(TransformError) as err:
        run(view, activation=None)
    msg = str(err.value)
    assert "smoothquant" in msg and "model.layers.4.self_attn.q_proj" in msg
    assert "quant_specs(activation=QSpec(...)) before smoothquant()" in msg
    recipe = chain(quant_specs(weight=W8), masked("*.self_attn.*", quant_specs(activation=A8)), smoothquant())
    with pytest.raises(TransformError, match=r"model\.layers\.4\.mlp\.gate_proj"):
        recipe.update(view, recipe.init(view))


def test_a_pair_split_by_the_mask_is_refused():
    view = random_block(0)
    recipe = chain(quant_specs(weight=W8, activation=A8), masked("*.q_proj", smoothquant()))
    with pytest.raises(TransformError, match=r"self_attn\.k_proj"):
        recipe.update(view, recipe.init(view))


def test_masked_smoothing_touches_only_its_pairs():
    view = random_block(2)
    recipe = chain(quant_specs(weight=W8, activation=A8), masked("*.mlp.*", smoothquant(pairs="all")))
    new, state = recipe.update(view, recipe.init(view))
    assert set(state.states[-1].scales) == {"post_attention_layernorm", "mlp.up_proj"}
    for key in ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.v_proj.weight",
                "self_attn.o_proj.weight"):
        assert torch.equal(new.params[key], view.params[key])
    assert relative(output(new), output(view)) < 1e-4


def test_weightless_norm_gets_the_inverse_scale():
    view = random_block(5)
    params = {k: v for k, v in view.params.items() if k != "input_layernorm.weight"}
    view = view._replace(params=params, stats=block_stats(params, view.structure, view.inputs))
    new, state = run(view)
    torch.testing.assert_close(new.params["input_layernorm.weight"], 1 / state.scales["input_layernorm"])
    assert relative(output(new), output(view)) < 1e-4


def test_contracts():
    view = random_block(1, bias=True, num_kv_heads=1, qk_norm=True)
    params = {k: v.clone() for k, v in view.params.items()}
    stats = {n: [t.clone() for t in s if t is not None] for n, s in view.stats.items()}
    new, state = run(view, search=True, pairs="all")
    again, state2 = run(view, search=True, pairs="all")
    for key, value in view.params.items():
        assert torch.equal(value, params[key]), f"{key} was mutated"
        assert new.params[key].dtype == value.dtype and new.params[key].shape == value.shape
        assert torch.equal(new.params[key], again.params[key])
    for name, s in view.stats.items():
        assert all(torch.equal(a, b) for a, b in zip([t for t in s if t is not None], stats[name]))
    assert state.search_errors == state2.search_errors
    back = state_from_dict(state_to_dict(state))
    assert isinstance(back, SmoothState) and back.alpha == state.alpha
    assert back.search_errors == state.search_errors
    assert all(torch.equal(back.scales[k], v) for k, v in state.scales.items())
    recipe = smoothquant(alpha=0.3, search=True, grid=[0.2, 0.4], pairs="all")
    assert recipe_from_dict(recipe_to_dict(recipe)).config == recipe.config


def test_bfloat16_params_keep_their_dtype():
    view = random_block(0)
    view = view._replace(params={k: v.to(torch.bfloat16) for k, v in view.params.items()})
    new, _ = run(view, pairs="all")
    assert all(new.params[k].dtype == torch.bfloat16 for k in view.params)


@pytest.mark.parametrize("kwargs", [dict(alpha=1.5), dict(alpha=True), dict(pairs="linears"),
                                    dict(grid=[]), dict(grid=[0.5, 2.0]), dict(search="yes")])
def test_bad_arguments_name_the_argument(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        smoothquant(**kwargs)


@settings(max_examples=10)
@given(block_views(), st.sampled_from([0.0, 1.0]))
def test_alpha_moves_the_difficulty_in_its_direction(view, alpha):
    """alpha = 1 puts all of it on the weights: every input channel's max|X'_j| becomes 1; alpha = 0
    puts none there: every channel's max|W'_j| (over the consumers) becomes 1 (Xiao et al. 2023, eq. 4)."""
    new, _ = run(view, alpha=alpha, pairs="norms")
    s = view.structure
    for group in ((s.q, s.k, s.v), (s.gate, s.up)):
        if alpha == 1.0:
            flat = new.stats[group[0]].absmax
        else:
            flat = torch.stack([new.weight(n).abs().amax(0) for n in group]).amax(0)
        torch.testing.assert_close(flat, torch.ones_like(flat), rtol=1e-4, atol=0)
