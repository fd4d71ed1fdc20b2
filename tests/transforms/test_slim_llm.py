"""SliM-LLM: exact mean bit width, per-group code ranges, never worse than uniform bits on the
calibration objective, layer errors, and the transform contracts."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qnpu.qcore import QSpec, fake_quantize
from qnpu.testing import random_block
from qnpu.transforms import (
    LinearSpec,
    TransformError,
    chain,
    quant_specs,
    recipe_from_dict,
    recipe_to_dict,
    state_from_dict,
    state_to_dict,
)
from qnpu.transforms.billm import inverse_hessian_cholesky
from qnpu.transforms.slim_llm import (
    allocate_bits,
    mixed_gptq,
    slim_llm,
    slim_llm_quantize,
)

U2 = QSpec(bits=2, symmetric=False, format="uint")

from .hessian_problems import h_error, problem


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and all(same(getattr(a, f.name), getattr(b, f.name))
                                          for f in dataclasses.fields(a))
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def run(recipe, view):
    return recipe.update(view, recipe.init(view))


@given(salience=st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=40),
       bits=st.integers(2, 7), data=st.data())
def test_allocation_is_exact_and_salience_ordered(salience, bits, data):
    s = torch.tensor(salience, dtype=torch.float64)
    pairs = data.draw(st.integers(0, len(salience) // 2))
    alloc = allocate_bits(s, bits, pairs)
    assert int(alloc.sum()) == bits * len(salience)
    assert int((alloc == bits + 1).sum()) == int((alloc == bits - 1).sum()) == pairs
    up, down, mid = s[alloc == bits + 1], s[alloc == bits - 1], s[alloc == bits]
    if pairs:
        assert up.min() >= torch.cat([mid, down]).max()
        assert down.max() <= torch.cat([mid, up]).min()


SPECS = [U2, QSpec(bits=2, symmetric=False, format="int"), QSpec(bits=3, symmetric=False, format="uint"),
         QSpec(bits=3, full_range=True), QSpec(bits=3, format="uint", clip_ratio=0.9)]


@settings(max_examples=15)
@given(seed=st.integers(0, 2**31 - 1), out=st.integers(2, 16), groups=st.integers(1, 5),
       group_size=st.sampled_from([4, 8, 16]), spec=st.sampled_from(SPECS), sqc=st.sampled_from([1, 4]))
def test_mean_bits_code_ranges_and_never_worse_than_uniform(seed, out, groups, group_size, spec, sqc):
    bits = spec.bits
    w, h = problem(seed, out, groups * group_size)
    sw = slim_llm_quantize(w, h, spec, bits=bits, group_size=group_size, sqc_grid=sqc)
    assert sw.group_bits.shape == (groups,) and int(sw.group_bits.sum()) == bits * groups
    assert sw.mean_bits == bits
    assert set(sw.group_bits.tolist()) <= {bits - 1, bits, bits + 1}
    mt = sw.qweight
    assert torch.equal(mt.group_bits, sw.group_bits) and mt.spec == spec and mt.group_size == group_size
    for g, b in enumerate(sw.group_bits.tolist()):
        codes = mt.codes[:, g * group_size:(g + 1) * group_size]
        if b == 1:
            assert set(codes.unique().tolist()) <= {-1, 1}
        else:
            gspec = spec.replace(bits=b)
            assert int(codes.min()) >= gspec.qmin and int(codes.max()) <= gspec.qmax
    q = mt.dequantize()
    assert q.shape == w.shape and q.dtype == w.dtype
    assert sw.objective.shape == (groups // 2 + 1,)
    assert float(sw.objective[sw.pairs]) == float(sw.objective.min())
    assert h_error(w, q, h) == pytest.approx(float(sw.objective[sw.pairs]), rel=1e-9, abs=1e-12)
    # the uniform allocation through the same sweep, computed independently
    w_c, u = inverse_hessian_cholesky(w, h, 0.01)
    uniform = mixed_gptq(w_c, u, torch.diag(h), spec, torch.full((groups,), bits), group_size, sqc)
    base = h_error(w, uniform.dequantize(), h)
    assert base == pytest.approx(float(sw.objective[0]), rel=1e-9, abs=1e-12)
    assert h_error(w, q, h) <= base * (1 + 1e-9) + 1e-12


@settings(max_examples=10)
@given(seed=st.integers(0, 2**31 - 1), bits=st.sampled_from([2, 3]))
def test_allocation_follows_the_hessian_group_salience(seed, bits):
    w, h = problem(seed, 8, 32)
    sw = slim_llm_quantize(w, h, QSpec(bits=bits, symmetric=False, format="uint"), bits=bits, group_size=4,
                           sqc_grid=1)
    assert torch.equal(sw.group_bits, allocate_bits(sw.group_salience, bits, sw.pairs))
    w_c, u = inverse_hessian_cholesky(w, h, 0.01)
    expect = ((w_c ** 2).sum(0) / torch.diag(u) ** 2).reshape(8, 4).sum(1)
    torch.testing.assert_close(sw.group_salience, expect)


def test_core_is_pure_and_deterministic():
    w, h = problem(2, 8, 32)
    w0, h0 = w.clone(), h.clone()
    a = slim_llm_quantize(w, h, U2, bits=2, group_size=8)
    b = slim_llm_quantize(w, h, U2, bits=2, group_size=8)
    assert torch.equal(w, w0) and torch.equal(h, h0) and same(a, b)
    with pytest.raises(ValueError, match="group_size=12 does not divide in_features=32"):
        slim_llm_quantize(w, h, U2, bits=2, group_size=12)


def test_max_pairs_bounds_the_search():
    w, h = problem(4, 8, 64)
    sw = slim_llm_quantize(w, h, U2, bits=2, group_size=8, max_pairs=1)
    assert sw.objective.shape == (2,) and sw.pairs <= 1


@pytest.fixture(scope="module")
def view():
    return random_block(0)


@pytest.fixture(scope="module")
def result(view):
    return run(chain(quant_specs(weight=U2), slim_llm(bits=2, group_size=32)), view)


def test_view_level_quantizes_every_linear_at_the_budget(view, result):
    new, state = result
    sws = state.states[-1].weights
    assert set(sws) == set(view.structure.linears)
    total, rtn_total = 0.0, 0.0
    for name, sw in sws.items():
        w, q = view.weight(name), new.weight(name)
        assert q.shape == w.shape and q.dtype == w.dtype
        assert torch.equal(q, sw.qweight.dequantize(w.dtype))
        assert state.states[-1].quantized.qweights[name] is sw.qweight
        assert sw.qweight.group_bits.numel() == w.shape[1] // 32 and sw.mean_bits == 2.0
        h = view.stats[name].hessian
        assert h_error(w, q, h) <= float(sw.objective[0]) * (1 + 1e-9)
        total += h_error(w, q, h)
        rtn_total += h_error(w, fake_quantize(w, U2.replace(granularity="group", group_size=32, axis=-1)), h)
    assert total < rtn_total
    for key in view.params:
        if not key.endswith("proj.weight"):
            assert new.params[key] is view.params[key], key


def test_view_level_no_mutation_determinism_and_state_round_trip(view, result):
    before = {k: v.clone() for k, v in view.params.items()}
    hess = {n: s.hessian.clone() for n, s in view.stats.items()}
    new, state = run(chain(quant_specs(weight=U2), slim_llm(bits=2, group_size=32)), view)
    assert same(dict(view.params), before)
    assert all(torch.equal(view.stats[n].hessian, hess[n]) for n in hess)
    assert same(dict(new.params), dict(result[0].params)) and same(state, result[1])
    assert same(state_from_dict(state_to_dict(state)), state)


def test_keeps_low_precision_dtypes():
    v = random_block(1, hidden=32, intermediate=48, num_heads=2, num_kv_heads=1)
    v = v.with_params({k: t.to(torch.bfloat16) for k, t in v.params.items()})
    spec = QSpec(bits=3, granularity="group", group_size=16, axis=-1)
    new, state = run(chain(quant_specs(weight=spec), slim_llm(bits=3, group_size=16, sqc_grid=2)), v)
    for key, t in v.params.items():
        assert new.params[key].dtype == torch.bfloat16 and new.params[key].shape == t.shape
    sw = state.states[-1].weights["mlp.down_proj"]
    assert sw.mean_bits == 3.0 and torch.equal(new.weight("mlp.down_proj"), sw.qweight.dequantize())


def test_group_size_not_dividing_in_features_names_layer_and_fix(view):
    # q_proj has in_features 64, down_proj 96: 48 divides only the latter
    with pytest.raises(TransformError, match=r"slim_llm: layer model\.layers\.0\.self_attn\.q_proj: "
                                             r"group_size=48 does not divide in_features=64.*Fix: pick"):
        run(chain(quant_specs(weight=U2), slim_llm(bits=2, group_size=48)), view)


@pytest.mark.parametrize("spec, match", [
    (QSpec(bits=3, symmetric=False, format="uint"), "bits=3"),
    (QSpec(bits=2, format="uint"), "symmetric"),
    (QSpec(bits=1, format="binary"), "binary"),
    (QSpec(bits=2, symmetric=False, format="uint", granularity="group", group_size=16, axis=-1), "group_size=16"),
    (QSpec(bits=2, symmetric=False, format="uint", granularity="tensor"), "granularity='tensor'"),
])
def test_specs_it_cannot_serve_fail_with_the_layer(view, spec, match):
    with pytest.raises(TransformError, match=rf"model\.layers\.0\.self_attn\.q_proj.*{match}"):
        run(chain(quant_specs(weight=spec), slim_llm(bits=2, group_size=32)), view)


def test_missing_hessian_or_fixed_qparams_fail(view):
    no_h = view.with_stats({"self_attn.q_proj": view.stats["self_attn.q_proj"]._replace(hessian=None)})
    with pytest.raises(TransformError, match=r"q_proj.*Hessian"):
        run(chain(quant_specs(weight=U2), slim_llm(bits=2, group_size=32)), no_h)
    fixed = view.with_specs({n: LinearSpec(U2, None, (torch.ones(1), torch.zeros(1))) for n in view.targets})
    with pytest.raises(TransformError, match="scale search"):
        run(slim_llm(bits=2, group_size=32), fixed)
    with pytest.raises(TransformError, match="quant_specs"):
        run(slim_llm(), view)


def test_recipe_round_trip():
    t = slim_llm(bits=3, group_size=64, sqc_grid=4, max_pairs=2)
    assert recipe_from_dict(recipe_to_dict(t)).config == t.config


@pytest.mark.parametrize("kwargs", [dict(bits=1), dict(bits=8), dict(bits=2.0), dict(group_size=0),
                                    dict(sqc_grid=0), dict(max_pairs=-1), dict(damp=0), dict(damp=float("inf"))])
def test_bad_arguments_fail_at_construction(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        slim_llm(**kwargs)


def test_one_bit_groups_are_binarized_around_the_row_mean():
    """Without error feedback (H = I makes U diagonal) each 1-bit group row is exactly
    ``mu + a sign(w - mu)``, ``mu`` its mean and ``a = mean|w - mu|``: two values per row."""
    w, _ = problem(11, 6, 24)
    w_c, u = inverse_hessian_cholesky(w, torch.eye(24), 0.01)
    bits = torch.tensor([1, 3, 1], dtype=torch.int32)
    mt = mixed_gptq(w_c, u, torch.ones(24), U2, bits, 8)
    q = mt.dequantize()
    for g in (0, 2):
        x = w_c[:, g * 8:(g + 1) * 8]
        mu = x.mean(1, keepdim=True)
        a = (x - mu).abs().mean(1, keepdim=True)
        torch.testing.assert_close(q[:, g * 8:(g + 1) * 8], mu + a * torch.where(x >= mu, 1.0, -1.0),
                                   rtol=1e-6, atol=1e-7)
        assert all(len(row.unique()) == 2 for row in q[:, g * 8:(g + 1) * 8])
        assert set(mt.codes[:, g * 8:(g + 1) * 8].unique().tolist()) == {-1, 1}


@pytest.mark.parametrize("seed", [0, 1])
def test_binarized_one_bit_groups_beat_the_one_bit_grid(seed):
    """On every linear of a random block, with half the groups at 1 bit, the calibration objective
    tr((W - Q) H (W - Q)^T) is lower binarized than on the asymmetric {0, x} 1-bit grid."""
    v = random_block(seed)
    for name in v.structure.linears:
        w, h = v.weight(name), v.stats[name].hessian
        w_c, u = inverse_hessian_cholesky(w, h, 0.01)
        n_groups = w.shape[1] // 32
        sal = ((w_c ** 2).sum(0) / torch.diag(u) ** 2).reshape(n_groups, 32).sum(1)
        alloc = allocate_bits(sal, 2, n_groups // 2)
        err = {mode: h_error(w, mixed_gptq(w_c, u, torch.diag(h), U2, alloc, 32, one_bit=mode).dequantize(), h)
               for mode in ("binarize", "grid")}
        assert err["binarize"] < err["grid"], name
