"""The rounder scaffold (`qnpu.transforms.rounder`): which targets it rounds, in what order it
refuses, and how it writes back (dequantized weight in the weight's dtype, quantized weight in the
one `WeightsState` channel, merged across calls)."""
import pytest
import torch

from qnpu.qcore import QSpec, quantize
from qnpu.testing import random_block
from qnpu.transforms import TransformError, WeightsState, quant_specs
from qnpu.transforms.rounder import weights_rounder

W4 = QSpec(bits=4)
Q, K = "self_attn.q_proj", "self_attn.k_proj"


def _toy(calls=None, check=None):
    def round_weight(view, name, w, spec):
        if calls is not None:
            calls.append(name)
        return quantize(w, spec)

    return weights_rounder("toy", round_weight, check=check)


def _specified(view, only=None):
    """``view`` with the W4 weight spec on ``only`` (a linear) or on every linear; all stay targets."""
    t = quant_specs(weight=W4)
    narrowed = view if only is None else view._replace(targets=(only,))
    return t.update(narrowed, t.init(narrowed))[0]._replace(targets=view.targets)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_targets_with_a_weight_spec_are_rounded_and_written_back_in_their_dtype(dtype):
    view = random_block(0)
    view = _specified(view._replace(params={k: v.to(dtype) for k, v in view.params.items()}), Q)
    t = _toy()
    new, weights = t.update(view, t.init(view))
    assert isinstance(weights, WeightsState) and set(weights.qweights) == {Q}
    want = quantize(view.weight(Q), W4).dequantize(dtype)
    assert new.weight(Q).dtype == dtype and torch.equal(new.weight(Q), want)
    for name in view.structure.linears:
        if name != Q:
            assert new.weight(name) is view.weight(name)  # no spec: left as it was


def test_only_targets_are_rounded_and_the_state_merges_across_calls():
    view = _specified(random_block(1))
    calls = []
    t = _toy(calls)
    view_q, s_q = t.update(view._replace(targets=(Q,)), t.init(view))
    assert calls == [Q] and set(s_q.qweights) == {Q}
    _, s_qk = t.update(view_q._replace(targets=(K,)), s_q)
    assert calls == [Q, K] and set(s_qk.qweights) == {Q, K} and s_qk.qweights[Q] is s_q.qweights[Q]


def test_check_runs_before_the_weight_is_read_and_round_weight_after_both():
    view = _specified(random_block(2))
    bad = view.with_params({f"{Q}.weight": torch.full_like(view.weight(Q), float("nan"))})
    order = []

    def check(view, name, spec):
        order.append(("check", name))
        if name == K:
            raise TransformError("toy: refused")

    calls = []
    t = _toy(calls, check)
    with pytest.raises(TransformError, match="layer model.layers.0.self_attn.q_proj: .*NaN"):
        t.update(bad, t.init(bad))  # q's check passes, then its weight is read and refused
    assert order == [("check", Q)] and calls == []
    order.clear()
    with pytest.raises(TransformError, match="toy: refused"):
        t.update(view, t.init(view))
    assert order == [("check", Q), ("check", K)] and calls == [Q]


def test_a_recipe_without_weight_specs_is_refused_naming_the_rounder():
    view = random_block(3)
    t = _toy()
    with pytest.raises(TransformError, match=r"toy: .*quant_specs\(weight=QSpec\(\.\.\.\)\) before toy\(\)"):
        t.update(view, t.init(view))
