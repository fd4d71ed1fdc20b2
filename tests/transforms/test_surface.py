"""The curated `qnpu.transforms` surface: the recipe API, not the block math.

The package exports every registered transform factory under its name, the combinators and
recipes, recipe / state (de)serialization, what a new transform registers with, and the types
the engine applies recipes with. Per-weight cores, the float block and the statistics stay in
their modules (docs/architecture.md, "Shared pieces and the package surface")."""
import importlib
import inspect
import types

import qnpu.transforms as T
from qnpu.transforms import base

# the non-transform names of the surface, by purpose (the transforms come from the registry)
RECIPES = {"recipes", "recipe_to_dict", "recipe_from_dict", "state_to_dict", "state_from_dict"}
EXTENDING = {"QTransform", "register_transform", "register_state", "registered_transforms", "READS",
             "UNDECLARED_READS", "reads_of", "union_reads", "declares_reads", "derive_seed", "generator"}
ENGINE = {"BlockView", "BlockStructure", "LinearSpec", "LinearStats", "make_view", "TransformError", "find_states",
          "rotate_edges", "rotation_matrix"}
# states the engine and users find in a recipe's state pytree; a new transform's state may join them
STATES = {"EmptyState", "WeightsState", "ActivationState", "AWQState", "RotationState", "ScaleSearchState",
          "SlimLLMState", "SmoothState"}
# block math and scaffolds: importable from their modules, never from the package
BLOCK_MATH = {"gptq_quantize": "gptq", "gptaq_quantize": "gptaq", "billm_quantize": "billm",
              "slim_llm_quantize": "slim_llm", "block_forward": "block", "attention_output": "block",
              "mlp_output": "block", "rms_norm": "block", "rope": "block", "block_stats": "stats",
              "linear_stats": "stats", "mse_qparams": "scale_search", "weights_rounder": "rounder",
              "check_int": "checks"}


def _registered_states() -> set:
    return set(base._STATE_TYPES)


def test_all_is_the_recipe_api():
    exported = set(T.__all__)
    assert len(T.__all__) == len(exported), "a name is listed twice"
    assert set(T.registered_transforms()) <= exported, "every registered transform is exported under its name"
    assert RECIPES | EXTENDING | ENGINE | STATES <= exported
    extra = exported - set(T.registered_transforms()) - RECIPES - EXTENDING - ENGINE - STATES
    assert extra <= _registered_states(), f"not recipe API: {sorted(extra - _registered_states())}"


def test_every_exported_name_resolves_and_transforms_are_their_factories():
    namespace = {}
    exec("from qnpu.transforms import *", namespace)
    assert set(T.__all__) <= set(namespace)
    for name in T.registered_transforms():
        t = getattr(T, name)
        assert callable(t) and t.__name__ == name
    assert isinstance(T.recipes, types.ModuleType) and callable(T.recipes.get) and callable(T.recipes.names)


def test_the_package_leaks_no_block_math():
    """Public attributes are the exported names plus submodules: a re-exported core, block function
    or scaffold helper shows up here even without an `__all__` entry."""
    public = {n for n in vars(T) if not n.startswith("_")}
    leaked = {n for n in public - set(T.__all__) if not isinstance(getattr(T, n), types.ModuleType)}
    assert leaked == set()
    for name, module in BLOCK_MATH.items():
        assert name not in T.__all__ and not callable(getattr(T, name, None))
        assert callable(getattr(importlib.import_module(f"qnpu.transforms.{module}"), name))
    # the surface exports no module but recipes, and nothing private
    assert [n for n in T.__all__ if isinstance(getattr(T, n), types.ModuleType)] == ["recipes"]
    assert not any(n.startswith("_") for n in T.__all__)


def test_exported_objects_come_from_the_transforms_package():
    for name in T.__all__:
        obj = getattr(T, name)
        if inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isfunction(obj):
            module = obj.__name__ if inspect.ismodule(obj) else obj.__module__
            assert module.startswith("qnpu.transforms."), (name, module)
