"""Scale searches: MSE search never worse than absmax/min-max, percentile semantics, wiring into rtn."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from qnpu.qcore import QSpec, choose_qparams, dequantize, quantize
from qnpu.testing import qspecs, quantization_cases, random_block, tensors
from qnpu.transforms import (
    chain,
    quant_specs,
    recipe_from_dict,
    recipe_to_dict,
    rtn,
    state_from_dict,
    state_to_dict,
)
from qnpu.transforms import scale_search as ss
from qnpu.transforms.scale_search import (
    minmax_scales,
    mse_qparams,
    mse_scale_search,
    percentile_qparams,
    percentile_scales,
)
from qnpu.transforms.view import TransformError

WEIGHT_SPECS = qspecs(granularities=("tensor", "channel", "group"), formats=("int", "uint"), bits=st.integers(2, 8))
W3 = QSpec(bits=3)
W4_GROUP_ASYM = QSpec(bits=4, format="uint", symmetric=False, granularity="group", axis=-1, group_size=16)


def objective(w, spec, scale, zp, norm=2.0, column_weight=None):
    """sum d_j |w - dq(q(w))|^norm, independently recomputed in float64 with qcore's own quantizer."""
    dq = dequantize(quantize(w, spec, scale=scale, zero_point=zp), torch.float64)
    e = (w.double() - dq).abs() ** norm
    return float((e if column_weight is None else e * column_weight.double()).sum())


def assert_not_worse(got, base):
    assert got <= base * (1 + 1e-5) + 1e-30, f"search error {got:.6g} > baseline {base:.6g}"


@given(quantization_cases(WEIGHT_SPECS), st.sampled_from([2.0, 2.4, 1.0]), st.integers(2, 40))
def test_mse_never_worse_than_minmax(case, norm, grid):
    w, spec = case
    scale, zp, ratio = mse_qparams(w, spec, grid=grid, min_ratio=0.3, norm=norm)
    s0, z0 = choose_qparams(w, spec)
    assert scale.shape == s0.shape == ratio.shape
    assert (zp is None) == (z0 is None)
    assert bool(((ratio > 0) & (ratio <= spec.clip_ratio * (1 + 1e-6))).all())
    assert_not_worse(objective(w, spec, scale, zp, norm), objective(w, spec, s0, z0, norm))


@given(quantization_cases(WEIGHT_SPECS), st.integers(0, 2**31 - 1))
def test_weighted_mse_never_worse_on_weighted_objective(case, seed):
    w, spec = case
    d = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(seed)) * 10
    scale, zp, _ = mse_qparams(w, spec, grid=25, column_weight=d)
    s0, z0 = choose_qparams(w, spec)
    assert_not_worse(objective(w, spec, scale, zp, column_weight=d), objective(w, spec, s0, z0, column_weight=d))


def test_mse_beats_absmax_on_gaussian_3bit():
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(0))
    scale, zp, ratio = mse_qparams(w, W3, grid=100)
    s0, _ = choose_qparams(w, W3)
    assert objective(w, W3, scale, zp) < 0.8 * objective(w, W3, s0, None)
    assert bool((ratio < 1).all())  # every Gaussian row prefers clipping at 3 bits


@given(quantization_cases(WEIGHT_SPECS, max_rows=8, max_groups=4), st.integers(1, 64))
@settings(max_examples=15)
def test_chunked_candidates_equal_one_batch(case, chunk):
    w, spec = case
    whole = mse_qparams(w, spec, grid=17)
    old = ss.CHUNK_ELEMENTS
    ss.CHUNK_ELEMENTS = chunk * w.numel()  # `chunk` candidates per batch
    try:
        parts = mse_qparams(w, spec, grid=17)
    finally:
        ss.CHUNK_ELEMENTS = old
    for a, b in zip(whole, parts):
        assert (a is None and b is None) or torch.equal(a, b)


@given(quantization_cases(WEIGHT_SPECS))
def test_percentile_100_is_minmax(case):
    w, spec = case
    scale, zp, frac = percentile_qparams(w, spec, 100.0)
    s0, z0 = choose_qparams(w, spec)
    assert torch.equal(scale, s0)
    assert (zp is None and z0 is None) or torch.equal(zp, z0)
    assert torch.allclose(frac, torch.full_like(frac, spec.clip_ratio))


MOSTLY_ZEROS = torch.tensor([[1.5, 0.0, 0.0, 0.0, 0.0]])


@given(quantization_cases(WEIGHT_SPECS), st.floats(50.0, 100.0))
@example((MOSTLY_ZEROS, QSpec(bits=4, format="uint", symmetric=False)), 50.0)
@example((MOSTLY_ZEROS, QSpec(bits=4)), 50.0)
def test_percentile_narrows_the_range(case, p):
    w, spec = case
    scale, _, frac = percentile_qparams(w, spec, p)
    s0, _ = choose_qparams(w, spec)
    assert bool((scale <= s0 * (1 + 1e-6)).all())
    assert bool((frac <= spec.clip_ratio * (1 + 1e-6)).all())


@given(tensors((6, 40)), st.floats(1.0, 100.0))
def test_percentile_matches_numpy_per_channel(w, p):
    spec = QSpec(bits=4)
    scale, _, _ = percentile_qparams(w, spec, p)
    a = w.abs().double().numpy()
    clip = np.percentile(a, p, axis=1, keepdims=True)
    clip = np.where(clip > 0, clip, a.max(1, keepdims=True))  # a zero percentile keeps the full range
    want = clip / spec.symmetric_levels
    want = np.where(want > 0, want, 1.0)
    np.testing.assert_allclose(scale.numpy(), want, rtol=1e-5)


def test_binary_specs_get_choose_qparams():
    w = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    spec = QSpec(bits=1, format="binary")
    s0, _ = choose_qparams(w, spec)
    for scale, zp, _ in (mse_qparams(w, spec), percentile_qparams(w, spec, 90.0)):
        assert torch.equal(scale, s0) and zp is None


# -- transforms on a block ---------------------------------------------------------------------------
def _run(t, view):
    return t.update(view, t.init(view))


@pytest.mark.parametrize("search", [mse_scale_search(grid=30), mse_scale_search(weighted=True),
                                    percentile_scales(99.0), minmax_scales()])
@pytest.mark.parametrize("spec", [W3, W4_GROUP_ASYM])
def test_rtn_uses_the_searched_qparams_and_weights_stay(search, spec):
    view = random_block(3)
    searched, cs = _run(chain(quant_specs(weight=spec), search), view)
    state = cs.states[1]
    for name in view.structure.linears:
        assert searched.params[f"{name}.weight"] is view.params[f"{name}.weight"]
        scale, zp = searched.specs[name].weight_qparams
        assert torch.equal(scale, state.qparams[name][0])
    _, rs = _run(rtn(), searched)
    for name, q in rs.qweights.items():
        scale, zp = state.qparams[name]
        assert torch.equal(q.scale, scale)
        assert (zp is None and q.zero_point is None) or torch.equal(q.zero_point, zp)


def test_minmax_scales_equal_plain_rtn():
    view = random_block(4)
    _, a = _run(chain(quant_specs(weight=W4_GROUP_ASYM), minmax_scales(), rtn()), view)
    _, b = _run(chain(quant_specs(weight=W4_GROUP_ASYM), rtn()), view)
    for name, q in a.states[2].qweights.items():
        assert torch.equal(q.codes, b.states[1].qweights[name].codes)


def test_weighted_search_never_worse_than_rtn_on_hessian_diag_objective():
    view = random_block(5)
    out, _ = _run(chain(quant_specs(weight=W3), mse_scale_search(weighted=True), rtn()), view)
    base, _ = _run(chain(quant_specs(weight=W3), rtn()), view)
    for name in view.structure.linears:
        d = torch.diagonal(view.stats[name].hessian).double()
        w = view.weight(name).double()

        def err(v):
            return float(((w - v.weight(name).double()) ** 2 * d).sum())

        assert_not_worse(err(out), err(base))


def test_no_input_mutation_and_determinism():
    view = random_block(6)
    before = {k: v.clone() for k, v in view.params.items()}
    hess = {k: s.hessian.clone() for k, s in view.stats.items()}
    t = chain(quant_specs(weight=W4_GROUP_ASYM), mse_scale_search(grid=20, weighted=True))
    a, sa = _run(t, view)
    b, sb = _run(t, view)
    assert all(torch.equal(view.params[k], v) for k, v in before.items())
    assert all(torch.equal(view.stats[k].hessian, h) for k, h in hess.items())
    assert all(view.specs.get(n) is None for n in view.structure.linears)
    for name in view.structure.linears:
        for x, y in zip(a.specs[name].weight_qparams, b.specs[name].weight_qparams):
            assert torch.equal(x, y)
        assert torch.equal(sa.states[1].ratios[name], sb.states[1].ratios[name])


@pytest.mark.parametrize("search", [mse_scale_search(grid=10), percentile_scales(99.5), minmax_scales()])
def test_state_and_recipe_round_trip(search):
    view = random_block(7)
    _, cs = _run(chain(quant_specs(weight=W4_GROUP_ASYM), search), view)
    state = cs.states[1]
    back = state_from_dict(state_to_dict(state))
    assert type(back) is type(state)
    for name, (scale, zp) in state.qparams.items():
        assert torch.equal(back.qparams[name][0], scale) and torch.equal(back.qparams[name][1], zp)
        assert torch.equal(back.ratios[name], state.ratios[name])
    assert recipe_to_dict(recipe_from_dict(recipe_to_dict(search))) == recipe_to_dict(search)


def test_errors_name_the_transform_layer_and_fix():
    view = random_block(8)
    with pytest.raises(TransformError, match=r"mse_scale_search: layer model\.layers\.0\..*quant_specs"):
        _run(mse_scale_search(), view)
    no_hessian = view.with_stats({n: s._replace(hessian=None) for n, s in view.stats.items()})
    with pytest.raises(TransformError, match=r"mse_scale_search: layer .*Hessian.*block_stats"):
        _run(chain(quant_specs(weight=W3), mse_scale_search(weighted=True)), no_hessian)
    nan = view.with_params({"mlp.up_proj.weight": torch.full_like(view.weight("mlp.up_proj"), float("nan"))})
    with pytest.raises(TransformError, match=r"percentile_scales: layer model\.layers\.0\.mlp\.up_proj"):
        _run(chain(quant_specs(weight=W3), percentile_scales()), nan)


@pytest.mark.parametrize("factory, kwargs", [
    (mse_scale_search, {"grid": 1}), (mse_scale_search, {"grid": 2.5}), (mse_scale_search, {"grid": True}),
    (mse_scale_search, {"min_ratio": 0.0}), (mse_scale_search, {"min_ratio": 1.5}),
    (mse_scale_search, {"norm": 0}), (mse_scale_search, {"norm": float("inf")}),
    (mse_scale_search, {"weighted": "yes"}),
    (percentile_scales, {"percentile": 0}), (percentile_scales, {"percentile": 100.5}),
    (percentile_scales, {"percentile": float("nan")}), (percentile_scales, {"percentile": "99"}),
])
def test_bad_arguments_raise_value_error(factory, kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        factory(**kwargs)


def test_weighted_search_uses_the_hessian_diagonal():
    view = random_block(9)
    _, cw = _run(chain(quant_specs(weight=W3), mse_scale_search(grid=40, weighted=True)), view)
    _, cu = _run(chain(quant_specs(weight=W3), mse_scale_search(grid=40)), view)
    differs = 0
    for name in view.structure.linears:
        want = mse_qparams(view.weight(name), W3, grid=40,
                           column_weight=torch.diagonal(view.stats[name].hessian))[0]
        assert torch.equal(cw.states[1].qparams[name][0], want)
        differs += not torch.equal(want, cu.states[1].qparams[name][0])
    assert differs > 0  # outlier input channels pull the weighted optimum elsewhere
