"""QuaRot rotations: block'(x Q) == block(x) Q, one Q for every block, stats follow the rotated
inputs, the edges keep the logits, outliers are spread, and unsupported sizes fail clearly."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qnpu.qcore import is_hadamard_order, random_hadamard
from qnpu.testing import block_views, random_block
from qnpu.transforms import TransformError, masked, recipe_from_dict, recipe_to_dict, state_from_dict, state_to_dict
from qnpu.transforms.block import block_forward, rms_norm
from qnpu.transforms.stats import block_stats, linear_stats
from qnpu.transforms.rotation import KINDS, RotationState, hadamard_rotation, rotate_edges, rotation_matrix

kinds = st.sampled_from(KINDS)


def run(view, **kwargs):
    t = hadamard_rotation(**kwargs)
    return t.update(view, t.init(view))


def forward(view, x=None, online=()):
    with torch.no_grad():
        return block_forward(view.params, view.structure, view.inputs if x is None else x,
                             online_hadamard=online)


def relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


def q_of(view, seed=0, kind="hadamard"):
    return rotation_matrix(view.structure.hidden_size, seed, kind, dtype=torch.float32)


def max_to_rms(x):
    rows = x.reshape(-1, x.shape[-1]).double()
    return float((rows.abs().amax(-1) / rows.pow(2).mean(-1).sqrt()).mean())


def kurtosis(x):
    rows = x.reshape(-1, x.shape[-1]).double()
    return float((rows.pow(4).mean(-1) / rows.pow(2).mean(-1) ** 2).mean())


@given(block_views(), kinds, st.booleans(), st.booleans(), st.integers(0, 2**16))
def test_rotated_block_commutes_with_the_rotation(view, kind, per_head, online, seed):
    new, state = run(view, seed=seed, kind=kind, per_head=per_head, online=online)
    q = q_of(view, seed, kind)
    assert state == RotationState(seed, kind, ("mlp.down_proj",) if online else (), per_head)
    torch.testing.assert_close(new.inputs, view.inputs @ q, rtol=1e-5, atol=1e-5)
    assert relative(forward(new, online=state.online), forward(view) @ q) < 1e-5
    for norm in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        assert torch.equal(new.params[norm], torch.ones_like(view.params[norm]))


@given(block_views(), kinds, st.booleans(), st.booleans())
def test_stats_match_the_rotated_block(view, kind, per_head, online):
    new, state = run(view, kind=kind, per_head=per_head, online=online)
    seen = {}
    with torch.no_grad():
        block_forward(new.params, new.structure, new.inputs, online_hadamard=state.online, capture=seen)
    for name in view.structure.linears:
        fresh = linear_stats(seen[name])
        for field in ("hessian", "absmax", "tokens"):
            got, want = getattr(new.stats[name], field), getattr(fresh, field)
            assert got.dtype == want.dtype and relative(got, want) < 1e-4, (name, field)


def test_gptaq_stats_rotate_too():
    view = random_block(2, bias=True)
    fp_x = view.inputs + 0.3 * torch.randn(view.inputs.shape, generator=torch.Generator().manual_seed(0))
    view = view._replace(stats=block_stats(view.params, view.structure, view.inputs, fp_x=fp_x))
    new, state = run(view)
    q = q_of(view)
    fresh = block_stats(new.params, new.structure, new.inputs, fp_x=fp_x @ q)
    for name in view.structure.residual_readers:
        for field in ("fp_tokens", "fp_cross"):
            assert relative(getattr(new.stats[name], field), getattr(fresh[name], field)) < 1e-4


def test_readers_with_different_stats_rotate_separately():
    view = random_block(4)
    k = view.structure.k
    view = view.with_stats({k: view.stats[k]._replace(hessian=2 * view.stats[k].hessian)})
    new, _ = run(view)
    q_h, k_h = new.stats[view.structure.q].hessian, new.stats[k].hessian
    torch.testing.assert_close(k_h, 2 * q_h, rtol=1e-5, atol=1e-6)


@settings(max_examples=10)
@given(kinds, st.integers(0, 2**31 - 1), st.sampled_from([1, 2, 12, 20, 64, 96]))
def test_rotation_matrix_is_orthogonal_and_seeded(kind, seed, hidden):
    q = rotation_matrix(hidden, seed, kind)
    torch.testing.assert_close(q @ q.T, torch.eye(hidden, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(q, rotation_matrix(hidden, seed, kind))
    if kind == "hadamard":
        assert torch.equal(q, random_hadamard(hidden, seed, dtype=torch.float64))
    if hidden >= 12:
        assert not torch.equal(q, rotation_matrix(hidden, seed + 1, kind))


@given(kinds, st.booleans())
def test_one_rotation_for_all_blocks(kind, online):
    """Same params under two prefixes rotate identically; two different rotated blocks compose:
    block1'(block0'(x Q)) == block1(block0(x)) Q."""
    b0, b1 = random_block(0, prefix="model.layers.0."), random_block(1, bias=True, prefix="model.layers.9.")
    r0, s0 = run(b0, kind=kind, online=online)
    r0_other, _ = run(b0._replace(prefix="model.layers.5."), kind=kind, online=online)
    assert all(torch.equal(r0.params[k], r0_other.params[k]) for k in r0.params)
    r1, s1 = run(b1, kind=kind, online=online)
    x = b0.inputs
    want = forward(b1, forward(b0, x)) @ q_of(b0, kind=kind)
    got = forward(r1, forward(r0, x @ q_of(b0, kind=kind), s0.online), s1.online)
    assert relative(got, want) < 1e-5


@settings(max_examples=10)
@given(block_views(bias=st.just(True), qk_norm=st.just(True)), kinds)
def test_qk_norms_see_unchanged_q_and_k(view, kind):
    new, _ = run(view, kind=kind)
    s = view.structure
    n1 = rms_norm(view.inputs, view.params[f"{s.attn_norm}.weight"], s.norm_eps)
    n1_rot = rms_norm(new.inputs, new.params[f"{s.attn_norm}.weight"], s.norm_eps)
    for name in (s.q, s.k):
        before = torch.nn.functional.linear(n1, view.weight(name), view.bias(name))
        after = torch.nn.functional.linear(n1_rot, new.weight(name), new.bias(name))
        assert relative(after, before) < 1e-5
    for norm in (s.q_norm, s.k_norm):
        assert torch.equal(new.params[f"{norm}.weight"], view.params[f"{norm}.weight"])


@settings(max_examples=10)
@given(block_views(), kinds)
def test_rotation_spreads_the_outlier_channels(view, kind):
    """QuaRot's claim: the rotated residual stream (and the normed inputs of q/k/v) has a lower
    max-to-rms ratio and kurtosis than the original one with its outlier channels."""
    new, _ = run(view, kind=kind)
    assert max_to_rms(new.inputs) < 0.75 * max_to_rms(view.inputs)
    assert kurtosis(new.inputs) < 0.5 * kurtosis(view.inputs)
    name = view.structure.q
    assert max_to_rms(new.stats[name].tokens) < 0.75 * max_to_rms(view.stats[name].tokens)


def test_offline_only_mode_needs_no_runtime_rotation():
    view = random_block(3, bias=True, num_kv_heads=1)
    t = hadamard_rotation(online=False)
    assert t.init(view).online == ()
    new, state = t.update(view, t.init(view))
    assert state.online == ()
    assert relative(forward(new), forward(view) @ q_of(view)) < 1e-5
    assert torch.equal(new.stats["mlp.down_proj"].hessian, view.stats["mlp.down_proj"].hessian)


def test_online_rotation_needs_a_hadamard_intermediate_size():
    assert not is_hadamard_order(90)
    view = random_block(0, intermediate=90, prefix="model.layers.2.")
    with pytest.raises(TransformError) as err:
        run(view)
    assert "hadamard_rotation" in str(err.value) and "model.layers.2.mlp.down_proj" in str(err.value)
    assert "online=False" in str(err.value)
    new, state = run(view, online=False)
    assert relative(forward(new), forward(view) @ q_of(view)) < 1e-5


def test_unsupported_orders_name_the_layer_and_the_fix():
    assert not is_hadamard_order(50) and not is_hadamard_order(6)
    wide = random_block(0, hidden=50)
    with pytest.raises(TransformError, match=r"self_attn\.q_proj.*kind='orthogonal'"):
        run(wide)
    new, state = run(wide, kind="orthogonal")
    assert relative(forward(new, online=state.online), forward(wide) @ q_of(wide, kind="orthogonal")) < 1e-5
    odd_heads = random_block(0, head_dim=6)
    with pytest.raises(TransformError, match=r"self_attn\.v_proj.*per_head=False"):
        run(odd_heads)
    new, state = run(odd_heads, per_head=False)
    assert relative(forward(new, online=state.online), forward(odd_heads) @ q_of(odd_heads)) < 1e-5


def test_a_partial_view_is_refused():
    view = random_block(0)
    t = masked("*.mlp.*", hadamard_rotation())
    with pytest.raises(TransformError, match=r"self_attn\.q_proj.*outside masked"):
        t.update(view, t.init(view))


@given(kinds, st.booleans(), st.booleans(), st.integers(0, 1000))
def test_edges_keep_the_logits(kind, tied, with_norm, seed):
    g = torch.Generator().manual_seed(seed)
    vocab, hidden = 11, 64
    embed = torch.randn(vocab, hidden, generator=g)
    head = None if tied else torch.randn(vocab, hidden, generator=g)
    norm = (1 + 0.3 * torch.randn(hidden, generator=g)) if with_norm else None
    x = torch.randn(5, hidden, generator=g) * (1 + 20 * (torch.arange(hidden) == 3))
    originals = [t.clone() for t in (embed, head, norm) if t is not None]
    new_embed, new_head, new_norm = rotate_edges(embed, head, norm, seed=seed, kind=kind)
    assert all(torch.equal(a, b) for a, b in zip(originals, [t for t in (embed, head, norm) if t is not None]))
    q = rotation_matrix(hidden, seed, kind, dtype=torch.float32)
    torch.testing.assert_close(new_embed, embed @ q, rtol=1e-5, atol=1e-5)
    assert (new_norm is None) == (norm is None)
    if norm is not None:
        assert torch.equal(new_norm, torch.ones_like(norm))
    want = rms_norm(x, norm, 1e-6) @ (embed if tied else head).T
    got = rms_norm(x @ q, new_norm, 1e-6) @ new_head.T
    assert relative(got, want) < 1e-5


def test_contracts():
    view = random_block(1, bias=True, num_kv_heads=1, qk_norm=True)
    params = {k: v.clone() for k, v in view.params.items()}
    stats = {n: [t.clone() for t in s if t is not None] for n, s in view.stats.items()}
    inputs = view.inputs.clone()
    new, state = run(view, seed=7, kind="orthogonal")
    again, state2 = run(view, seed=7, kind="orthogonal")
    assert torch.equal(view.inputs, inputs)
    for key, value in view.params.items():
        assert torch.equal(value, params[key]), f"{key} was mutated"
        assert new.params[key].dtype == value.dtype and new.params[key].shape == value.shape
        assert torch.equal(new.params[key], again.params[key])
    for name, s in view.stats.items():
        assert all(torch.equal(a, b) for a, b in zip([t for t in s if t is not None], stats[name]))
    assert state == state2 and not any(isinstance(f, torch.Tensor) for f in state)
    assert state_from_dict(state_to_dict(state)) == state
    recipe = hadamard_rotation(seed=3, kind="orthogonal", online=False, per_head=False)
    assert recipe_from_dict(recipe_to_dict(recipe)).config == recipe.config


def test_bfloat16_params_keep_their_dtype():
    view = random_block(0)
    view = view._replace(params={k: v.to(torch.bfloat16) for k, v in view.params.items()})
    new, _ = run(view)
    assert all(new.params[k].dtype == torch.bfloat16 for k in view.params)


@pytest.mark.parametrize("kwargs", [dict(kind="random"), dict(seed=-1), dict(seed=1.5), dict(online="yes"),
                                    dict(per_head=None)])
def test_bad_arguments_name_the_argument(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        hadamard_rotation(**kwargs)
