"""qnpu.transforms: pure quantization algorithms that compose into recipes.

A transform is ``QTransform(init, update)``: ``state = t.init(view)``,
``view, state = t.update(view, state)`` over a `BlockView` (one decoder block's params,
structure, calibration stats and specs); ``t.reads`` declares which calibration data it reads
(`reads_of`). Recipes are values::

    recipe = chain(quant_specs(weight=QSpec(bits=4)), masked("*.mlp.down_proj",
                   quant_specs(weight=QSpec(bits=8))), gptq(block_size=128))
"""
from .base import (
    READS,
    UNDECLARED_READS,
    EmptyState,
    QTransform,
    declares_reads,
    derive_seed,
    find_states,
    generator,
    recipe_from_dict,
    recipe_to_dict,
    register_state,
    reads_of,
    register_transform,
    registered_transforms,
    state_from_dict,
    state_to_dict,
    union_reads,
)
from . import recipes
from .activations import ActivationState, activation_scales
from .awq import AWQState, awq
from .billm import billm
from .block import attention_output, block_forward, mlp_output, rms_norm, rope
from .combinators import chain, masked, partition, quant_specs
from .gptaq import gptaq, gptaq_quantize
from .gptq import gptq, gptq_quantize
from .hqq import HQQState, hqq
from .rounding import WeightsState, rtn
from .rotation import RotationState, hadamard_rotation, rotate_edges, rotation_matrix
from .scale_search import ScaleSearchState, minmax_scales, mse_scale_search, percentile_scales
from .slim_llm import SlimLLMState, slim_llm
from .smoothing import SmoothState, smoothquant
from .stats import block_stats, linear_stats
from .view import BlockStructure, BlockView, LinearSpec, LinearStats, TransformError, make_view

__all__ = [
    "recipes",
    "QTransform", "EmptyState", "WeightsState", "register_transform", "register_state", "registered_transforms",
    "READS", "UNDECLARED_READS", "reads_of", "union_reads", "declares_reads",
    "recipe_to_dict", "recipe_from_dict", "state_to_dict", "state_from_dict", "derive_seed", "find_states", "generator",
    "chain", "masked", "partition", "quant_specs", "rtn", "gptq", "gptq_quantize", "gptaq", "gptaq_quantize",
    "activation_scales", "ActivationState", "awq", "AWQState",
    "minmax_scales", "percentile_scales", "mse_scale_search", "ScaleSearchState",
    "hqq", "HQQState",
    "billm", "slim_llm", "SlimLLMState", "smoothquant", "SmoothState",
    "hadamard_rotation", "RotationState", "rotate_edges", "rotation_matrix",
    "BlockStructure", "BlockView", "LinearSpec", "LinearStats", "TransformError", "make_view",
    "block_forward", "attention_output", "mlp_output", "rms_norm", "rope", "block_stats", "linear_stats",
]
