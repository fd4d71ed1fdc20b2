"""BiLLM: binary codes, honest bit count, reconstruction from the state, and the calibration objective."""
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
    masked,
    quant_specs,
    recipe_from_dict,
    recipe_to_dict,
    state_from_dict,
    state_to_dict,
)
from qnpu.transforms.billm import BinarizedWeight, billm, billm_dequantize, billm_quantize, quantiles

BINARY = QSpec(bits=1, format="binary")

from .hessian_problems import h_error, problem


def sign_binarized(w: torch.Tensor) -> torch.Tensor:
    """Plain per-row ``alpha * sign(W)``, ``alpha = mean|W|``."""
    return fake_quantize(w, BINARY)


def expected_bytes(bw: BinarizedWeight) -> int:
    """Stored bytes, counted from the layout: four 1-bit planes and the fp32 parameters in use."""
    out, n_in = bw.codes.shape
    n_s = int(bw.salient.sum())
    nb = -(-n_in // bw.block_size)
    planes = [out * n_in, out * n_s, n_in] + ([out * (n_in - n_s)] if bw.split else [])
    components = (2 if n_s else 0) + 1 + (1 if bw.split else 0)
    return (sum(-(-bits // 8) for bits in planes)
            + 4 * components * out * nb * (2 if bw.mean_offsets else 1))


def expected_bits(bw: BinarizedWeight) -> float:
    return 8 * expected_bytes(bw) / bw.codes.numel()


def reconstruct(bw: BinarizedWeight) -> torch.Tensor:
    """Column by column from the stored components (independent of `billm_dequantize`)."""
    out, n_in = bw.codes.shape
    q = torch.empty(out, n_in, dtype=bw.scale.dtype)
    rank = torch.cumsum(bw.salient.long(), 0) - 1
    for j in range(n_in):
        a, mu = bw.scale[:, :, j // bw.block_size], bw.offset[:, :, j // bw.block_size]
        c = bw.codes[:, j].to(q.dtype)
        if bw.salient[j]:
            r = bw.residual_codes[:, rank[j]].to(q.dtype)
            q[:, j] = mu[0] + a[0] * c + mu[1] + a[1] * r
        else:
            q[:, j] = torch.where(bw.sparse[:, j], mu[3] + a[3] * c, mu[2] + a[2] * c)
    return q


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


@settings(max_examples=20)
@given(seed=st.integers(0, 2**31 - 1), out=st.integers(2, 24), n_in=st.integers(4, 48),
       block_size=st.sampled_from([4, 16, 128]), fraction=st.sampled_from([None, 0.0, 0.1, 0.25]),
       split=st.booleans(), offsets=st.booleans())
def test_codes_masks_bits_and_reconstruction(seed, out, n_in, block_size, fraction, split, offsets):
    w, h = problem(seed, out, n_in)
    bw = billm_quantize(w, h, block_size=block_size, salient_fraction=fraction, max_salient_fraction=0.2,
                        split=split, mean_offsets=offsets, split_grid=8)
    n_s = int(bw.salient.sum())
    assert bw.codes.dtype == torch.int8 and bw.codes.shape == (out, n_in)
    assert bw.residual_codes.dtype == torch.int8 and bw.residual_codes.shape == (out, n_s)
    for codes in (bw.codes, bw.residual_codes):
        assert set(codes.unique().tolist()) <= {-1, 1}
    assert not bw.sparse[:, bw.salient].any(), "salient columns are not split"
    if not split:
        assert not bw.sparse.any()
    if not offsets:
        assert not bw.offset.any()
    for i in range(0, n_in, block_size):
        nb = min(block_size, n_in - i)
        k = int(bw.salient[i:i + nb].sum())
        if fraction is None:
            assert k <= min(nb // 2, int(0.2 * nb))
        else:
            assert k == min(nb // 2, int(round(fraction * nb)))
    torch.testing.assert_close(billm_dequantize(bw), reconstruct(bw))
    assert bw.bits_per_weight == pytest.approx(expected_bits(bw), rel=1e-12)
    assert bw.paper_bits_per_weight == pytest.approx(1 + n_s / n_in, rel=1e-12)
    assert 1.0 <= bw.paper_bits_per_weight <= 1 + 1 / 3  # fraction 0.25 of a 3- or 6-column block rounds to 1/3
    assert bw.bits_per_weight >= bw.paper_bits_per_weight + (1 - n_s / n_in if split else 0) - 1e-12


def test_bits_on_a_model_sized_layer():
    """A 128 x 256 layer (block 128): ~1.1 sign bits as the paper counts; the stored total adds the
    split bitmap and the fp32 per-row, per-block scales and offsets."""
    w, h = problem(3, 128, 256)
    bw = billm_quantize(w, h)
    assert 1.0 < bw.paper_bits_per_weight <= 1.2
    assert bw.bits_per_weight == pytest.approx(expected_bits(bw))
    assert bw.packed_nbytes == expected_bytes(bw)
    assert 3.0 < bw.bits_per_weight < 5.0
    lean = billm_quantize(w, h, split=False, mean_offsets=False, block_size=256)
    assert lean.bits_per_weight == pytest.approx(expected_bits(lean))
    assert 1.0 < lean.bits_per_weight < 1.6


@settings(max_examples=10)
@given(seed=st.integers(0, 2**31 - 1), out=st.integers(4, 24), n_in=st.integers(8, 40))
def test_first_block_salient_columns_are_the_most_salient(seed, out, n_in):
    w, h = problem(seed, out, n_in)
    bw = billm_quantize(w, h, block_size=128, salient_fraction=0.25, split_grid=4)
    hd = h.double() + 0.01 * torch.diag(h.double()).mean() * torch.eye(n_in, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(hd), upper=True)
    salience = (w.double() ** 2).sum(0) / torch.diag(u) ** 2
    k = int(bw.salient.sum())
    assert k == min(n_in // 2, round(0.25 * n_in))
    chosen, rest = salience[bw.salient], salience[~bw.salient]
    assert chosen.min() >= rest.max() * (1 - 1e-4)


@settings(max_examples=10)
@given(seed=st.integers(0, 2**31 - 1), out=st.integers(8, 32), n_in=st.integers(16, 64),
       split=st.booleans(), offsets=st.booleans())
def test_beats_plain_sign_binarization_on_the_hessian_objective(seed, out, n_in, split, offsets):
    w, h = problem(seed, out, n_in)
    bw = billm_quantize(w, h, block_size=32, split=split, mean_offsets=offsets, split_grid=8)
    assert h_error(w, billm_dequantize(bw), h) < h_error(w, sign_binarized(w), h)


def test_core_is_pure_and_deterministic():
    w, h = problem(5, 16, 40)
    w0, h0 = w.clone(), h.clone()
    a, b = billm_quantize(w, h, block_size=16), billm_quantize(w, h, block_size=16)
    assert torch.equal(w, w0) and torch.equal(h, h0)
    assert same(a, b)


@pytest.fixture(scope="module")
def view():
    return random_block(0)


@pytest.fixture(scope="module")
def result(view):
    return run(chain(quant_specs(weight=BINARY), billm()), view)


def test_view_level_binarizes_every_linear(view, result):
    new, state = result
    bws = state.states[-1].qweights
    assert set(bws) == set(view.structure.linears)
    for name, bw in bws.items():
        w, q = view.weight(name), new.weight(name)
        assert q.shape == w.shape and q.dtype == w.dtype
        assert torch.equal(q, billm_dequantize(bw))
        torch.testing.assert_close(q, reconstruct(bw))
        h = view.stats[name].hessian
        assert h_error(w, q, h) < h_error(w, sign_binarized(w), h), name
        assert 1.0 <= bw.paper_bits_per_weight <= 1.3 and bw.bits_per_weight == pytest.approx(expected_bits(bw))
    for key in view.params:
        if not key.endswith("proj.weight"):
            assert new.params[key] is view.params[key], key


def test_view_level_no_mutation_determinism_and_state_round_trip(view, result):
    before = {k: v.clone() for k, v in view.params.items()}
    hess = {n: s.hessian.clone() for n, s in view.stats.items()}
    new, state = run(chain(quant_specs(weight=BINARY), billm()), view)
    assert same(dict(view.params), before)
    assert all(torch.equal(view.stats[n].hessian, hess[n]) for n in hess)
    assert same(dict(new.params), dict(result[0].params)) and same(state, result[1])
    assert same(state_from_dict(state_to_dict(state)), state)


def test_keeps_low_precision_dtypes():
    v = random_block(1, hidden=32, intermediate=48, num_heads=2, num_kv_heads=1)
    v = v.with_params({k: t.to(torch.bfloat16) for k, t in v.params.items()})
    new, state = run(chain(quant_specs(weight=BINARY), billm(block_size=16)), v)
    for key, t in v.params.items():
        assert new.params[key].dtype == torch.bfloat16 and new.params[key].shape == t.shape
    bw = state.states[-1].qweights["mlp.down_proj"]
    assert bw.dtype == torch.bfloat16 and torch.equal(new.weight("mlp.down_proj"), billm_dequantize(bw))


def test_masked_binarizes_only_the_matching_layers(view):
    new, state = run(chain(quant_specs(weight=BINARY), masked("*.mlp.*", billm())), view)
    assert set(state.states[-1].qweights) == {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert new.weight("self_attn.q_proj") is view.weight("self_attn.q_proj")


def test_recipe_round_trip():
    t = billm(block_size=64, salient_fraction=0.05, split=False)
    assert recipe_from_dict(recipe_to_dict(t)).config == t.config


@pytest.mark.parametrize("kwargs", [dict(block_size=0), dict(block_size=True), dict(salient_fraction=0.7),
                                    dict(max_salient_fraction=-0.1), dict(split="yes"), dict(split_grid=0),
                                    dict(damp=0.0), dict(mean_offsets=None)])
def test_bad_arguments_fail_at_construction(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        billm(**kwargs)


def test_layer_errors_name_the_layer_and_the_fix(view):
    label = "model.layers.0.self_attn.q_proj"
    with pytest.raises(TransformError, match=f"{label}.*binary"):
        run(chain(quant_specs(weight=QSpec(bits=4)), billm()), view)
    with pytest.raises(TransformError, match="quant_specs"):
        run(billm(), view)
    no_h = view.with_stats({"self_attn.q_proj": view.stats["self_attn.q_proj"]._replace(hessian=None)})
    with pytest.raises(TransformError, match=f"{label}.*Hessian"):
        run(chain(quant_specs(weight=BINARY), billm()), no_h)
    fixed = view.with_specs({n: LinearSpec(BINARY, None, (torch.ones(1), None)) for n in view.targets})
    with pytest.raises(TransformError, match="scale search"):
        run(billm(), fixed)
    w = view.weight("self_attn.q_proj").clone()
    w[0, 0] = float("nan")
    with pytest.raises(TransformError, match=f"{label}.*NaN"):
        run(chain(quant_specs(weight=BINARY), billm()), view.with_params({"self_attn.q_proj.weight": w}))


def test_break_point_quantiles_equal_torch_quantile():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        levels = torch.linspace(0.1, 0.9, 40, dtype=dtype)
        for n in (1, 2, 7, 40, 1001):
            x = torch.randn(n, generator=g, dtype=dtype).abs()
            assert torch.equal(quantiles(x, levels), torch.quantile(x, levels)), (dtype, n)


def test_break_point_quantiles_work_above_torch_quantile_limit():
    """2^24 + 1 elements, where torch.quantile raises (the real size, not a patched limit; a
    descending ramp keeps the sort cheap and makes the value at rank r equal to r)."""
    n = 2 ** 24 + 1
    x = torch.arange(n - 1, -1, -1, dtype=torch.float32)
    levels = torch.linspace(0.1, 0.9, 5)
    with pytest.raises(RuntimeError, match="too large"):
        torch.quantile(x, levels)
    torch.testing.assert_close(quantiles(x, levels).double(), levels.double() * (n - 1), rtol=1e-7, atol=0.0)
