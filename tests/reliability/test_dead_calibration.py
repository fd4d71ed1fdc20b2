"""Inputs that are zero on every calibration token ("dead" columns, Hessian diagonal 0) get their
weights zeroed by the Hessian-based rounders: a warning names the layer, the count and the first
columns; a layer whose whole input is dead (e.g. calibration sequences of pad tokens) is refused,
since every weight would be zeroed."""
from __future__ import annotations

import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qnpu.models import quantize_model
from qnpu.qcore import QSpec
from qnpu.testing import random_block
from qnpu.transforms import chain, quant_specs, rtn
from qnpu.transforms.billm import billm
from qnpu.transforms.gptaq import gptaq, gptaq_quantize
from qnpu.transforms.gptq import gptq, gptq_quantize
from qnpu.transforms.slim_llm import slim_llm
from qnpu.transforms.view import TransformError

LABEL = "model.layers.2.mlp.up_proj"
W4 = QSpec(bits=4)
FUNCTIONS = {"gptq": lambda w, h: gptq_quantize(w, h, W4, label=LABEL),
             "gptaq": lambda w, h: gptaq_quantize(w, h, 0.01 * torch.ones_like(h), W4, label=LABEL)}
RECIPES = {"gptq": lambda: chain(quant_specs(weight=W4), gptq()),
           "gptaq": lambda: chain(quant_specs(weight=W4), gptaq()),
           "billm": lambda: chain(quant_specs(weight=QSpec(bits=1, format="binary")), billm(block_size=32)),
           "slim_llm": lambda: chain(quant_specs(weight=QSpec(bits=2, symmetric=False, format="uint")),
                                     slim_llm(bits=2, group_size=32, sqc_grid=2))}


def problem(dead=()) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 32, generator=g)
    x[:, list(dead)] = 0.0
    return torch.randn(16, 32, generator=g), x.T @ x / x.shape[0]


@pytest.mark.parametrize("method", FUNCTIONS)
def test_partly_dead_inputs_warn_naming_the_layer_the_count_and_the_columns(method):
    w, h = problem(dead=(3, 17))
    with pytest.warns(RuntimeWarning, match=rf"{method}: layer {LABEL}: 2 of 32 input columns .*\(3, 17\)"):
        q, info = FUNCTIONS[method](w, h)
    assert info["dead_columns"] == 2 and not bool(q.dequantize()[:, [3, 17]].any())


@pytest.mark.parametrize("method", FUNCTIONS)
def test_many_dead_columns_show_the_first_few(method):
    w, h = problem(dead=range(2, 30))
    with pytest.warns(RuntimeWarning, match=r"28 of 32 input columns .*\(2, 3, 4, 5, 6, 7, 8, 9, \.\.\.\)"):
        FUNCTIONS[method](w, h)


@pytest.mark.parametrize("method", FUNCTIONS)
def test_a_layer_whose_whole_input_is_dead_is_refused(method):
    w, h = problem(dead=range(32))
    with pytest.raises(TransformError, match=rf"{method}: layer {LABEL}: all 32 input columns"):
        FUNCTIONS[method](w, h)


@pytest.mark.parametrize("method", FUNCTIONS)
def test_live_inputs_do_not_warn(method):
    w, h = problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FUNCTIONS[method](w, h)


def _with_dead_up_proj_inputs(view, columns):
    st = view.stats["mlp.up_proj"]
    h = st.hessian.clone()
    h[columns, :] = 0.0
    h[:, columns] = 0.0
    return view._replace(stats={**view.stats, "mlp.up_proj": st._replace(hessian=h)})


@pytest.mark.parametrize("name", RECIPES)
def test_every_hessian_rounder_warns_and_refuses(name):
    recipe = RECIPES[name]()
    view = _with_dead_up_proj_inputs(random_block(0), [5, 9])
    with pytest.warns(RuntimeWarning, match=r"layer model\.layers\.0\.mlp\.up_proj: 2 of 64 input columns .*\(5, 9\)"):
        recipe.update(view, recipe.init(view))
    view = _with_dead_up_proj_inputs(random_block(0), list(range(64)))
    with pytest.raises(TransformError, match=r"layer model\.layers\.0\.mlp\.up_proj: all 64 input columns"):
        recipe.update(view, recipe.init(view))


def _pad_model() -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight[0] = 0.0  # the pad token's embedding
    return model


def test_calibration_on_pad_tokens_is_refused_naming_the_first_layer():
    ids = torch.zeros(2, 16, dtype=torch.long)
    with pytest.raises(TransformError, match=r"gptq: layer model\.layers\.0\.self_attn\.q_proj: all 32 input columns"):
        quantize_model(_pad_model(), chain(quant_specs(weight=W4), gptq()), ids, progress=False)
    # RTN does not read the calibration data: it still rounds the weights as they are
    result = quantize_model(_pad_model(), chain(quant_specs(weight=W4), rtn()), ids, progress=False)
    assert bool(result.model.model.layers[0].self_attn.q_proj.weight.any())
