"""lower(): lowered vs simulated tiny random models per scheme and family, with the bound per scheme.

Per-layer bounds (relative Frobenius error of one lowered linear vs its QLinear on the layer's
real input, float32 model):
* weight-only (W8A16, W4A16): the same dequantized weight and an fp32 matmul: <= 1e-6.
* W8A8 dynamic / W4A8: the same codes; only ``x * (127/amax)`` vs ``x / (amax/127)`` may flip a
  rounding tie, and fp32 epilogue order differs: <= 1e-5.
* W8A8 static (float32 / float16 models): the deq scale is truncated to fp19 (relative change
  < 2^-10 per output channel) and the bias rounded into int32: <= 2e-3.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from transformers import LlamaConfig

from qnpu.lowering import (LoweringError, W4A8Linear, W4A8MatmulLinear, W8A8DynamicLinear, W8A8StaticLinear, WeightOnlyLinear, lower,
                           plan, quantized_linears)
from qnpu.models import quantize_model
from qnpu.transforms import recipes
from tests.models.test_families import configs, ids, relative, tiny_model

BOUND = {"W8A16": 1e-6, "W4A16": 1e-6, "W8A8_DYNAMIC": 1e-5, "W4A8_DYNAMIC": 1e-5, "W8A8": 2e-3}
CASES = [("w8a8", None), ("w8a8-dynamic", None), ("w8a16", None), ("w8a16", 32), ("w4a16-gptq", None),
         ("w4a16-gptq", 32), ("w4a8", None), ("w4a8", 32), ("w3a16-gptq", None)]


def quantized(family: str = "llama", recipe: str = "w8a8-dynamic", group=None, config=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_model(config or configs()[family])
        return quantize_model(model, recipes.get(recipe, group_size=group), ids(), progress=False).model


def layer_inputs(model) -> dict[str, torch.Tensor]:
    seen = {}

    def keep(name):
        def hook(module, args, output):
            seen.setdefault(name, args[0].detach())  # returns None: the output is left alone
        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in quantized_linears(model)]
    with torch.no_grad():
        model(ids())
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("family", ["llama", "qwen2", "openpangu-embedded"])
@pytest.mark.parametrize("recipe,group", CASES)
def test_every_lowered_layer_is_within_its_scheme_bound(family, recipe, group):
    model = quantized(family, recipe, group)
    schemes = plan(model)
    low = lower(model)
    lowered = dict(low.named_modules())
    for label, x in layer_inputs(model).items():
        simulated = dict(model.named_modules())[label]
        with torch.no_grad():
            err = relative(lowered[label](x), simulated(x))
        assert err <= BOUND[schemes[label]], (label, schemes[label], err)
    with torch.no_grad():
        end = relative(low(ids()).logits, model(ids()).logits)
    assert end < 0.05, end


def test_schemes_and_modules_per_recipe():
    assert set(plan(quantized("llama", "w8a8")).values()) == {"W8A8", "W8A8_DYNAMIC"}  # down_proj stays dynamic
    low = lower(quantized("llama", "w4a16-gptq", 32))
    mods = [m for m in low.modules() if isinstance(m, WeightOnlyLinear)]
    assert mods and all(m.scheme == "W4A16" and m.weight.dtype == torch.int32 and m.group_size == 32 for m in mods)
    low = lower(quantized("llama", "w8a8"))
    assert any(isinstance(m, W8A8StaticLinear) for m in low.modules())
    assert all(m.deq_scale.dtype == torch.int64 for m in low.modules() if isinstance(m, W8A8StaticLinear))


def test_w4a8_uses_the_a8w4_matmul_when_k_is_a_multiple_of_256():
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    model = quantized(recipe="w4a8", config=cfg)
    low = lower(model)
    mods = [m for m in low.modules() if isinstance(m, W4A8Linear)]
    assert len(mods) == 7 and all(m.weight.dtype == torch.int32 and m.scale.dtype == torch.int64 for m in mods)
    lowered = dict(low.named_modules())
    for label, x in layer_inputs(model).items():
        with torch.no_grad():
            err = relative(lowered[label](x), dict(model.named_modules())[label](x))
        assert err <= 2e-3, (label, err)  # the A8W4 scale is the fp19 word, as on the NPU


def test_w4a8_falls_back_to_widened_int8_when_k_is_not_a_multiple_of_256():
    low = lower(quantized("llama", "w4a8"))
    mods = [m for m in low.modules() if isinstance(m, W8A8DynamicLinear)]
    assert mods and all(m.scheme == "W4A8_DYNAMIC" and int(m.weight.abs().max()) <= 8 for m in mods)


def test_w4a8_groups_other_than_256_run_on_w4a8_matmul_with_fp32_scales():
    model = quantized("llama", "w4a8", 32)
    low = lower(model)
    mods = [m for m in low.modules() if isinstance(m, (W4A8Linear, W8A8DynamicLinear, W4A8MatmulLinear))]
    assert mods and all(isinstance(m, W4A8MatmulLinear) and m.group_size == 32 for m in mods)
    for m in mods:
        assert m.weight.dtype == torch.int32 and m.scale.dtype == torch.float32
        assert m.scale.shape == (m.in_features // 32, m.out_features)   # (k / g, n), as the kernel reads it
    q = dict(model.named_modules())[mods[0].label].qweight
    assert torch.equal(mods[0].scale, q.scale.t().to(torch.float32))


def test_w4a8_groups_the_kernel_cannot_take_are_refused_before_building():
    with pytest.raises(LoweringError, match=r"q_proj: W4A8 per-group scales need groups of 256 .* a multiple of 32"):
        plan(quantized("llama", "w4a8", 16))


@pytest.mark.parametrize("recipe,group", [("w4a16-gptq", 16), ("w8a16", 16), ("w4a16-gptq", 64)])
def test_weight_only_groups_the_op_refuses_are_refused_by_plan(recipe, group):
    # the tiny model's q_proj has K = 64: groups must be a multiple of 32 in [32, 63]
    with pytest.raises(LoweringError, match=rf"q_proj: weight-only groups of {group} over in_features 64: .*\[32, 63\]"):
        plan(quantized("llama", recipe, group))


@pytest.mark.parametrize("recipe,group", [("w8a8", None), ("w8a8-dynamic", None), ("w4a16-gptq", 32), ("w4a8", None),
                                          ("w4a8", 64)])
def test_bf16_lowered_model_tracks_bf16_simulation(recipe, group):
    model = quantized("qwen2", recipe, group).to(torch.bfloat16)
    low = lower(model)
    assert all(m.dtype == torch.bfloat16 for m in low.modules() if hasattr(m, "scheme") and hasattr(m, "dtype"))
    with torch.no_grad():
        a, b = low(ids()).logits.float(), model(ids()).logits.float()
    assert relative(a, b) < 0.05


def test_online_hadamard_runs_explicitly_on_reference():
    model = quantized("llama", "w4a8-hadamard")
    low = lower(model)
    rotated = [m for m in low.modules() if getattr(m, "online_hadamard", False) and hasattr(m, "scheme")]
    assert rotated and all(m.label.endswith("down_proj") for m in rotated)
    with torch.no_grad():
        assert relative(low(ids()).logits, model(ids()).logits) < 0.05


def test_lower_returns_a_new_model_and_leaves_its_input_untouched():
    model = quantized("llama", "w8a8-dynamic")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = [type(m).__name__ for m in model.modules()]
    low = lower(model)
    assert low is not model
    assert [type(m).__name__ for m in model.modules()] == kinds
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_input_is_refused_before_any_work():
    model = quantized("llama", "w8a8-dynamic")
    with pytest.raises(LoweringError, match="target='cuda' does not exist; allowed: ascend | reference"):
        lower(model, "cuda")
    with pytest.raises(LoweringError, match="no quantized linears"):
        lower(tiny_model(configs()["llama"]))
    billm = quantized("llama", "billm")
    before = {k: v.clone() for k, v in billm.state_dict().items()}
    with pytest.raises(LoweringError, match=r"model\.layers\.0\.self_attn\.q_proj: BiLLM binarized weights have "
                                            r"no Ascend integer kernel"):
        lower(billm)
    with pytest.raises(LoweringError, match=r"q_proj: SliM-LLM mixed-precision \(1-3 bit groups\) weights have no "
                                            r"Ascend integer kernel"):
        lower(quantized("llama", "slim-llm"))
    assert all(torch.equal(before[k], v) for k, v in billm.state_dict().items())


@pytest.mark.parametrize("weight,activation,match", [
    (dict(bits=8, symmetric=False, format="uint"), dict(bits=8, granularity="token", dynamic=True), "asymmetric weights"),
    (dict(bits=4), dict(bits=4, granularity="token", dynamic=True), "a4 int symmetric dynamic has no Ascend kernel"),
    (dict(bits=8), dict(bits=8, granularity="token", dynamic=True, symmetric=False), "asymmetric dynamic"),
])
def test_schemes_without_a_kernel_are_refused_naming_the_layer(weight, activation, match):
    from qnpu.qcore import QSpec
    from qnpu.transforms import chain, quant_specs, rtn
    recipe = chain(quant_specs(weight=QSpec(**weight), activation=QSpec(**activation)), rtn())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = quantize_model(tiny_model(configs()["llama"]), recipe, ids(), progress=False).model
    with pytest.raises(LoweringError, match=r"model\.layers\.0\.self_attn\.q_proj: .*" + match):
        lower(model)


def test_torch_compile_fullgraph_traces_a_lowered_model():
    model = quantized("llama", "w8a8")  # static and dynamic schemes in one model
    low = lower(model)
    linear = next(m for m in low.modules() if isinstance(m, W8A8StaticLinear))
    x = torch.randn(3, 5, linear.in_features)
    compiled = torch.compile(linear, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), linear(x))
    dyn = next(m for m in low.modules() if isinstance(m, W8A8DynamicLinear))
    x = torch.randn(7, dyn.in_features)
    assert torch.equal(torch.compile(dyn, fullgraph=True, backend="aot_eager")(x), dyn(x))
