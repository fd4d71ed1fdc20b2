import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qnpu.qcore import QSpec
from qnpu.testing import random_block
from qnpu.transforms import (
    TransformError,
    chain,
    masked,
    partition,
    quant_specs,
    recipe_from_dict,
    recipe_to_dict,
    registered_transforms,
    rtn,
    state_from_dict,
    state_to_dict,
)

W4, W8 = QSpec(bits=4), QSpec(bits=8)


def run(recipe, view):
    return recipe.update(view, recipe.init(view))


def bits_by_layer(state) -> dict:
    return {name: q.spec.bits for name, q in state.states[-1].qweights.items()}


def test_masked_routes_by_glob():
    view = random_block(0)
    _, state = run(chain(quant_specs(weight=W4), masked("*.mlp.down_proj", quant_specs(weight=W8)), rtn()), view)
    bits = bits_by_layer(state)
    assert bits.pop("mlp.down_proj") == 8
    assert set(bits.values()) == {4}


def test_masked_routes_by_regex_on_the_full_label():
    view = random_block(0, prefix="model.layers.7.")
    recipe = chain(quant_specs(weight=W4), masked(r"re:model\.layers\.7\.self_attn\.[qk]_proj", quant_specs(weight=W8)), rtn())
    bits = bits_by_layer(run(recipe, view)[1])
    assert {n for n, b in bits.items() if b == 8} == {"self_attn.q_proj", "self_attn.k_proj"}


def test_partition_gives_first_match_and_default():
    view = random_block(0)
    recipe = chain(partition({"*.down_proj": quant_specs(weight=W8), "*_proj": quant_specs(weight=QSpec(bits=3))},
                             default=quant_specs(weight=W4)), rtn())
    bits = bits_by_layer(run(recipe, view)[1])
    assert bits["mlp.down_proj"] == 8 and bits["self_attn.q_proj"] == 3


def test_masked_with_no_match_leaves_the_view_alone():
    view = random_block(0)
    new, _ = run(masked("*.nothing", chain(quant_specs(weight=W4), rtn())), view)
    assert new is view


def test_layers_without_a_weight_spec_stay_float():
    view = random_block(0)
    new, state = run(chain(masked("*.mlp.*", quant_specs(weight=W4)), rtn()), view)
    assert set(state.states[-1].qweights) == {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert torch.equal(new.weight("self_attn.q_proj"), view.weight("self_attn.q_proj"))


def test_rtn_without_any_spec_explains_the_fix():
    with pytest.raises(TransformError, match=r"rtn: layer model\.layers\.0\.self_attn\.q_proj: .*quant_specs"):
        run(rtn(), random_block(0))


def test_group_size_that_does_not_divide_names_layer_and_fix():
    spec = QSpec(bits=4, granularity="group", group_size=64, axis=-1)
    with pytest.raises(TransformError, match=r"quant_specs: layer model\.layers\.0\.mlp\.down_proj: group_size=64 .* in_features=96"):
        run(chain(quant_specs(weight=spec), rtn()), random_block(0))


def test_bad_recipe_arguments_fail_at_construction():
    with pytest.raises(ValueError, match="axis=-1"):
        quant_specs(weight=QSpec(bits=4, granularity="group", group_size=32))
    with pytest.raises(ValueError, match="activation granularity"):
        quant_specs(activation=QSpec(bits=8))
    with pytest.raises(ValueError, match="pattern"):
        masked("re:(", rtn())
    with pytest.raises(TypeError, match="chain"):
        chain(rtn(), "gptq")
    with pytest.raises(ValueError, match="rounding"):
        rtn(rounding="up")


@given(st.sampled_from([
    chain(quant_specs(weight=W4, activation=QSpec(bits=8, granularity="token", dynamic=True)), rtn()),
    chain(partition({"*.down_proj": quant_specs(weight=W8)}, default=quant_specs(weight=W4)), rtn("stochastic", seed=3)),
    masked("re:.*self_attn.*", chain(quant_specs(weight=QSpec(bits=2, symmetric=False, format="uint")), rtn())),
]))
def test_recipes_round_trip_through_json_exactly(recipe):
    again = recipe_from_dict(json.loads(json.dumps(recipe_to_dict(recipe))))
    assert again.config == recipe.config
    view = random_block(1)
    (v1, _), (v2, _) = run(recipe, view), run(again, view)
    for key in v1.params:
        assert torch.equal(v1.params[key], v2.params[key])


def test_unknown_recipe_entry_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown transform 'gptx'.*rtn"):
        recipe_from_dict({"transform": "gptx"})
    assert {"chain", "masked", "partition", "quant_specs", "rtn"} <= set(registered_transforms())


def test_state_round_trips_through_a_dict():
    view = random_block(0)
    _, state = run(chain(quant_specs(weight=QSpec(bits=4, symmetric=False, format="uint")), rtn()), view)
    again = state_from_dict(state_to_dict(state))
    for name, q in state.states[-1].qweights.items():
        q2 = again.states[-1].qweights[name]
        assert q2.spec == q.spec and torch.equal(q2.codes, q.codes) and torch.equal(q2.zero_point, q.zero_point)


def test_stochastic_rtn_is_seeded_per_layer():
    view = random_block(0)
    r = chain(quant_specs(weight=QSpec(bits=3)), rtn("stochastic", seed=5))
    a, b = run(r, view)[0], run(r, view)[0]
    assert torch.equal(a.weight("mlp.up_proj"), b.weight("mlp.up_proj"))
    other = run(chain(quant_specs(weight=QSpec(bits=3)), rtn("stochastic", seed=6)), view)[0]
    assert not torch.equal(a.weight("mlp.up_proj"), other.weight("mlp.up_proj"))


def test_weight_qparams_are_dropped_when_a_weight_changes():
    view = random_block(0)
    new, _ = run(quant_specs(weight=W4), view)
    name = "mlp.up_proj"
    fixed = new.with_specs({name: new.specs[name]._replace(weight_qparams=(torch.ones(96, 1), None))})
    assert fixed.with_params({f"{name}.weight": 2 * fixed.weight(name)}).specs[name].weight_qparams is None
