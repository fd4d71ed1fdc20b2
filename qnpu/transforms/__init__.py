"""qnpu.transforms: pure quantization algorithms that compose into recipes.

A transform is ``QTransform(init, update)``: ``state = t.init(view)``,
``view, state = t.update(view, state)`` over a `BlockView` (one decoder block's params,
structure, calibration stats and specs); ``t.reads`` declares which calibration data it reads
(`reads_of`). Recipes are values::

    recipe = chain(quant_specs(weight=QSpec(bits=4)), masked("*.mlp.down_proj",
                   quant_specs(weight=QSpec(bits=8))), gptq(block_size=128))

This package exports the recipe API only (`__all__`, pinned by tests/transforms/test_surface.py):

* transforms: every registered factory (`rtn`, `gptq`, `awq`, ...; `registered_transforms`);
* combinators `chain`, `masked`, `partition`; the built-in `recipes` (``recipes.get``, ``names``);
* recipe and state (de)serialization, and what a new transform registers with;
* what the engine applies recipes with: `BlockView` and its parts, `make_view`, the states it
  reads (`find_states`), `TransformError`, and `rotate_edges` / `rotation_matrix` for the edges.

The block math stays in its modules: per-weight cores (``gptq.gptq_quantize``,
``gptaq.gptaq_quantize``, ``billm.billm_quantize``, ``slim_llm.slim_llm_quantize``), the float
block (``block.block_forward``, ``attention_output``, ``mlp_output``, ``rms_norm``, ``rope``), the
statistics (``stats.block_stats``, ``linear_stats``), the scale searches' cores
(``scale_search.mse_qparams``, ...), and the shared scaffolds (``rounder``, ``checks``).
"""
from . import recipes
from .activations import ActivationState, activation_scales
from .awq import AWQState, awq
from .base import (
    READS,
    UNDECLARED_READS,
    EmptyState,
    QTransform,
    declares_reads,
    derive_seed,
    find_states,
    generator,
    reads_of,
    recipe_from_dict,
    recipe_to_dict,
    register_state,
    register_transform,
    registered_transforms,
    state_from_dict,
    state_to_dict,
    union_reads,
)
from .billm import billm
from .combinators import chain, masked, partition, quant_specs
from .gptaq import gptaq
from .gptq import gptq
from .hqq import HQQState, hqq
from .rounder import WeightsState
from .rounding import rtn
from .rotation import RotationState, hadamard_rotation, rotate_edges, rotation_matrix
from .scale_search import ScaleSearchState, minmax_scales, mse_scale_search, percentile_scales
from .slim_llm import SlimLLMState, slim_llm
from .smoothing import SmoothState, smoothquant
from .view import BlockStructure, BlockView, LinearSpec, LinearStats, TransformError, make_view

__all__ = [
    # transforms (one per registered factory) and combinators
    "quant_specs", "chain", "masked", "partition",
    "minmax_scales", "percentile_scales", "mse_scale_search", "awq", "smoothquant", "hadamard_rotation",
    "rtn", "gptq", "gptaq", "hqq", "billm", "slim_llm", "activation_scales",
    # built-in recipes, recipe and state files
    "recipes", "recipe_to_dict", "recipe_from_dict", "state_to_dict", "state_from_dict",
    # writing a transform
    "QTransform", "register_transform", "register_state", "registered_transforms", "READS", "UNDECLARED_READS",
    "reads_of", "union_reads", "declares_reads", "derive_seed", "generator",
    # applying a recipe to a block (the engine's side)
    "BlockView", "BlockStructure", "LinearSpec", "LinearStats", "make_view", "TransformError", "find_states",
    "EmptyState", "WeightsState", "ActivationState", "AWQState", "RotationState", "ScaleSearchState",
    "SlimLLMState", "SmoothState", "HQQState", "rotate_edges", "rotation_matrix",
]
