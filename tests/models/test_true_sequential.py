"""True-sequential calibration and GPTAQ's driver, on random blocks run by a one-layer HF Llama.

Each group's statistics must be those of the block with the earlier groups quantized (weights and
activation quantizers), computed independently here with the functional block
(`qnpu.transforms.block.block_forward`); GPTAQ's ``fp_cross`` must pair the float block's input
with the quantized path's, after the linear's own dynamic activation quantizer."""
from __future__ import annotations

import warnings

import pytest
import torch

from qnpu.models.engine import quantize_model
from qnpu.qcore import QSpec, fake_quantize
from qnpu.testing.blocks import random_block
from qnpu.transforms import QTransform, awq, chain, gptaq, gptq, quant_specs, reads_of, rtn
from qnpu.transforms.block import block_forward
from qnpu.transforms.stats import linear_stats

from .random_llama import llama_of_block

W3 = QSpec(bits=3)
A8 = QSpec(bits=8, granularity="token", dynamic=True)
Q, K, V, O, GATE, UP, DOWN = random_block(0).structure.linears
ORDER = ((Q, K, V), (O,), (GATE, UP), (DOWN,))


def recorded(seen: list, recipe: QTransform) -> QTransform:
    """``recipe``, appending every view it receives to ``seen`` (and reading what it reads)."""
    return QTransform(recipe.init, lambda view, state: seen.append(view) or recipe.update(view, state),
                      reads=reads_of(recipe))


def run(seed: int, rounder: QTransform, *, act: QSpec | None = None, true_sequential: bool | None = True, **kw):
    """Quantize random block ``seed``; returns (its view, the views the recipe got, the result)."""
    view = random_block(seed, batch=8, seq=32)
    model, ids = llama_of_block(view)
    seen: list = []
    recipe = recorded(seen, chain(quant_specs(weight=W3, activation=act), rounder))
    result = quantize_model(model, recipe, ids, progress=False, max_stat_tokens=64, true_sequential=true_sequential,
                            **kw)
    return view, seen, result


def inputs_after(view, result, done, act: QSpec | None) -> dict:
    """Every linear's input in the block whose linears ``done`` carry their quantized weights (and
    the activation quantizer ``act``), by the functional block; float elsewhere."""
    params = dict(view.params)
    for n in done:
        params[f"{n}.weight"] = result.blocks[0].qweights[n].dequantize(torch.float32)
    seen: dict = {}
    block_forward(params, view.structure, view.inputs, capture=seen,
                  act_specs={n: act for n in done} if act is not None else None)
    return seen


@pytest.mark.parametrize("act", [None, A8])
def test_each_group_gets_the_statistics_of_the_block_with_earlier_groups_quantized(act):
    view, seen, result = run(0, gptq(), act=act)
    assert [v.targets for v in seen] == [view.structure.linears, *ORDER]  # block 0 decides, then 4 groups
    for g, names in enumerate(ORDER):
        expected = inputs_after(view, result, [n for group in ORDER[:g] for n in group], act)
        for n in names:
            ref = linear_stats(expected[n])
            got = seen[g + 1].stats[n]
            torch.testing.assert_close(got.hessian, ref.hessian, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(got.absmax, ref.absmax, rtol=1e-5, atol=1e-5)
    # the check has teeth: o_proj's quantized-path statistics are not the float block's
    float_h = seen[0].stats[O].hessian
    assert not torch.allclose(seen[2].stats[O].hessian, float_h, rtol=1e-3, atol=1e-3)


def test_off_is_one_pass_on_the_float_block():
    view, seen, result = run(1, gptq(), true_sequential=False)
    assert len(seen) == 1 and seen[0].targets == view.structure.linears
    expected = inputs_after(view, result, [], None)
    for n in view.structure.linears:
        torch.testing.assert_close(seen[0].stats[n].hessian, linear_stats(expected[n]).hessian, rtol=1e-4,
                                   atol=1e-4)
    on = run(1, gptq())[2].blocks[0]
    assert on.output_error < result.blocks[0].output_error  # 3 bits: fitting the real inputs pays


@pytest.mark.parametrize("act", [None, A8])
def test_gptaq_delta_x_is_float_input_minus_quantized_path_input(act):
    view, seen, result = run(2, gptaq(), act=act, true_sequential=None)  # GPTAQ: on by default
    stages = seen[1:] if act is None else seen[2::2]  # with specs known, each group is captured again
    assert [v.targets for v in seen[1:]] == (list(ORDER) if act is None else
                                              [g for g in ORDER for _ in range(2)])  # re-captured after specs
    fp = inputs_after(view, result, [], None)
    for g, names in enumerate(ORDER):
        quantized = inputs_after(view, result, [n for group in ORDER[:g] for n in group], act)
        for n in names:
            x = quantized[n] if act is None else fake_quantize(quantized[n], act)  # its own quantizer
            ref = linear_stats(x, fp_x=fp[n])
            got = stages[g].stats[n]
            torch.testing.assert_close(got.fp_cross, ref.fp_cross, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(got.hessian, ref.hessian, rtol=1e-4, atol=1e-4)
            if act is None and g == 0:
                assert float(got.fp_cross.abs().max()) == 0.0  # block 0's q/k/v: both paths agree
            else:
                assert float(got.fp_cross.abs().max()) > 1e-3


@pytest.mark.parametrize("act", [None, A8])
def test_gptaq_on_block_0_differs_from_gptq_where_the_paths_differ(act):
    codes = {name: run(3, rounder, act=act)[2].blocks[0].qweights for name, rounder in
             (("gptq", gptq()), ("gptaq", gptaq()))}
    for n in (O, GATE, UP, DOWN) if act is None else (Q, K, V, O, GATE, UP, DOWN):
        assert not torch.equal(codes["gptq"][n].codes, codes["gptaq"][n].codes), n
    if act is None:  # the first group sees the float block's input on both paths: GPTAQ is GPTQ there
        assert all(torch.equal(codes["gptq"][n].codes, codes["gptaq"][n].codes) for n in (Q, K, V))


def test_the_default_is_on_for_recipes_that_only_round():
    assert run(5, gptaq(), true_sequential=None)[2].true_sequential
    assert run(5, gptq(), true_sequential=None)[2].true_sequential
    assert not run(5, gptq(), true_sequential=False)[2].true_sequential


def test_recipes_that_rescale_keep_the_one_pass_path():
    model, ids = llama_of_block(random_block(4, batch=8, seq=32))
    seen: list = []
    recipe = recorded(seen, chain(quant_specs(weight=QSpec(bits=4, granularity="group", group_size=16, axis=-1)),
                                  awq(), rtn()))
    with pytest.warns(UserWarning, match="one pass"):
        quantize_model(model, recipe, ids, progress=False, true_sequential=True, batch_size=4)
    # block 0 decides on its first batch (it rescales), then runs one pass on every batch
    assert len(seen) == 2 and seen[0].stats[Q].tokens.shape[0] < seen[1].stats[Q].tokens.shape[0]
    seen.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = quantize_model(model, recipe, ids, progress=False, batch_size=4)  # the default: silently one pass
    assert len(seen) == 2 and not result.true_sequential
    with pytest.raises(ValueError, match="true_sequential"):
        quantize_model(model, recipe, ids, progress=False, true_sequential="yes")
