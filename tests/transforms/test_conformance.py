"""Every transform through the same contracts (one row per algorithm; docs/architecture.md, "Adding an
algorithm").

Contracts: inputs are not mutated; the same seed gives bit-identical output; params keep their
dtypes and shapes; the state survives a plain-dict round trip; and where the method promises it,
the error on its calibration objective (the Hessian-weighted weight error summed over the block's
linears, tr((W - Q) H (W - Q)^T)) is no worse than RTN with the same spec.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from qnpu.qcore import QSpec
from qnpu.testing import random_block
from qnpu.transforms import (
    awq,
    billm,
    chain,
    gptaq,
    gptq,
    hadamard_rotation,
    hqq,
    mse_scale_search,
    percentile_scales,
    quant_specs,
    rtn,
    slim_llm,
    smoothquant,
    state_from_dict,
    state_to_dict,
)

W4 = QSpec(bits=4)
W3G = QSpec(bits=3, granularity="group", group_size=32, axis=-1, symmetric=False, format="uint")
A8 = QSpec(bits=8, granularity="token", dynamic=True)


def _rows():
    """(id, recipe builder taking the weight spec, weight spec, promises <= RTN error)."""
    rows = [
        ("rtn", lambda w: chain(quant_specs(weight=w), rtn()), W4, False),
        ("rtn-stochastic", lambda w: chain(quant_specs(weight=w), rtn("stochastic", seed=1)), W4, False),
        # a diagonal-Hessian-weighted search: better on the diagonal part only, so no promise
        ("mse-weighted", lambda w: chain(quant_specs(weight=w), mse_scale_search(weighted=True), rtn()), W3G, False),
        ("percentile", lambda w: chain(quant_specs(weight=w), percentile_scales(), rtn()), W4, False),
        # AWQ rescales weights and stats, so the weight-space Hessian error is not its objective
        ("awq", lambda w: chain(quant_specs(weight=w), awq(), rtn()), W3G, False),
        ("smoothquant", lambda w: chain(quant_specs(weight=w, activation=A8), smoothquant(0.8), rtn()), W4, False),
        ("smoothquant-search", lambda w: chain(quant_specs(weight=w, activation=A8), smoothquant(search=True, pairs="all"),
                                               rtn()), W4, False),
        ("hadamard-rotation", lambda w: chain(quant_specs(weight=w), hadamard_rotation(seed=3), rtn()), W4, False),
        ("rotation-offline", lambda w: chain(quant_specs(weight=w), hadamard_rotation(kind="orthogonal", online=False),
                                             rtn()), W4, False),
        # lp weight error per group (Badri & Shaji 2023), not the Hessian-weighted one: no promise here
        ("hqq", lambda w: chain(quant_specs(weight=w), hqq(), rtn()), W3G.replace(zero_point_domain="float"), False),
        ("gptq", lambda w: chain(quant_specs(weight=w), gptq()), W4, True),
        ("gptq-w3-group", lambda w: chain(quant_specs(weight=w), gptq(act_order=False)), W3G, True),
        ("gptaq", lambda w: chain(quant_specs(weight=w), gptaq()), W4, True),
        ("billm", lambda w: chain(quant_specs(weight=w), billm()), QSpec(bits=1, format="binary"), True),
        ("slim_llm", lambda w: chain(quant_specs(weight=w), slim_llm(bits=3, group_size=32)), W3G, True),
    ]
    return rows


ROWS = _rows()


def _snapshot(view):
    return ({k: v.clone() for k, v in view.params.items()},
            {n: [None if t is None else t.clone() for t in s] for n, s in view.stats.items()},
            None if view.inputs is None else view.inputs.clone())


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if dataclasses.is_dataclass(a):  # QTensor, BiLLMTensor, MixedTensor
        return type(a) is type(b) and all(_same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    return a == b


def _run(recipe, view):
    return recipe.update(view, recipe.init(view))


def hessian_weighted_error(before, after) -> float:
    total = 0.0
    for name in before.structure.linears:
        d = (before.weight(name) - after.weight(name)).double()
        total += float(torch.einsum("oi,ij,oj->", d, before.stats[name].hessian.double(), d))
    return total


@pytest.fixture(scope="module")
def views():
    return [random_block(0), random_block(1, bias=True, num_kv_heads=1, qk_norm=True)]


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_contracts(row, views):
    _, build, spec, _ = row
    for view in views:
        before = _snapshot(view)
        new, state = _run(build(spec), view)
        assert _same(_snapshot(view), before), "inputs were mutated"
        new2, state2 = _run(build(spec), view)
        assert _same(dict(new.params), dict(new2.params)) and _same(state, state2), "not deterministic"
        for key, value in view.params.items():
            assert new.params[key].dtype == value.dtype and new.params[key].shape == value.shape, key
        assert _same(state_from_dict(state_to_dict(state)), state), "state dict round trip"


@pytest.mark.parametrize("row", [r for r in ROWS if r[3]], ids=[r[0] for r in ROWS if r[3]])
def test_no_worse_than_rtn_on_the_calibration_objective(row, views):
    _, build, spec, _ = row
    for view in views:
        ours = hessian_weighted_error(view, _run(build(spec), view)[0])
        base = hessian_weighted_error(view, _run(chain(quant_specs(weight=spec), rtn()), view)[0])
        assert ours <= base * (1 + 1e-6)
