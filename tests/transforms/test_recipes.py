import json

import pytest
import torch

from qnpu.testing import random_block
from qnpu.transforms import TransformError, WeightsState, find_states, recipe_from_dict, recipe_to_dict, recipes


@pytest.mark.parametrize("name", recipes.names())
def test_every_builtin_recipe_runs_and_round_trips(name, tmp_path):
    group = 32 if name in ("slim-llm", "w4a16-hqq") else None  # their default groups do not divide 96
    recipe = recipes.get(name, group_size=group)
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe_to_dict(recipe)))
    again = recipes.load(path)
    assert again.config == recipe.config
    view = random_block(2, num_kv_heads=1)
    new, state = recipe.update(view, recipe.init(view))
    changed = [n for n in view.structure.linears if not torch.equal(new.weight(n), view.weight(n))]
    assert changed, f"{name} quantized no weight"
    assert recipes.describe(name)


def test_yaml_recipe_file(tmp_path):
    yaml = pytest.importorskip("yaml")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_to_dict(recipes.get("w4a16-rtn", group_size=32))))
    recipe = recipes.load(path)
    view = random_block(0)
    _, state = recipe.update(view, recipe.init(view))
    (weights,) = find_states(state, WeightsState)
    assert weights.qweights["mlp.down_proj"].spec.group_size == 32


def test_malformed_yaml_recipe_is_a_value_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("transform: chain\n  transforms: [")
    with pytest.raises(ValueError, match="not valid YAML"):
        recipes.load(path)


def test_group_size_sets_the_column_groups_of_billm_and_slim_llm():
    def rounder(name):
        return recipes.get(name, group_size=32).config["transforms"][-1]

    assert rounder("billm")["block_size"] == 32 and rounder("slim-llm")["group_size"] == 32
    assert recipes.get("billm").config["transforms"][-1]["block_size"] == 128


def test_hqq_is_grouped_by_default():
    def weight_spec(**kw):
        return recipes.get("w4a16-hqq", **kw).config["transforms"][0]["weight"]["__qspec__"]

    assert weight_spec()["granularity"] == "group" and weight_spec()["group_size"] == 64
    assert weight_spec(group_size=32)["group_size"] == 32


def test_unknown_recipe_suggests_close_names():
    with pytest.raises(ValueError, match="did you mean w4a16-gptq"):
        recipes.get("w4a16-gtpq")


def test_group_size_that_does_not_divide_fails_with_the_fix():
    recipe = recipes.get("w4a16-rtn", group_size=128)  # 576 / 128 on SmolLM2; here in_features 64 / 96
    view = random_block(0)
    with pytest.raises(TransformError, match="does not divide in_features=64.*Fix: pick a divisor"):
        recipe.update(view, recipe.init(view))


def test_w8a8_keeps_down_proj_dynamic():
    recipe = recipes.get("w8a8")
    view = random_block(0)
    new, _ = recipe.update(view, recipe.init(view))
    assert new.specs["mlp.down_proj"].activation.dynamic
    assert not new.specs["self_attn.q_proj"].activation.dynamic


def test_recipe_dicts_rebuild_identically():
    for name in recipes.names():
        recipe = recipes.get(name)
        assert recipe_from_dict(json.loads(json.dumps(recipe_to_dict(recipe)))).config == recipe.config
