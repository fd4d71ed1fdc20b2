"""qnpu.models: the impure edge. Real Hugging Face models, calibration hooks, checkpoints.

``load(name_or_path)`` -> (model, tokenizer, source); ``quantize_model(model, recipe,
calibration_ids)`` quantizes block by block in place; ``save_quantized`` / ``load_quantized``
write and read checkpoints bit-exactly; ``quantize_from_disk`` streams a model too large for memory.
"""
from .checkpoint import Checkpoint, CheckpointWriter
from .default import DEFAULT_MODEL, load_default
from .engine import quantize_model
from .results import BlockResult, QuantizeResult
from .families import Family, block_structure, family_for, supported_model_types, to_llama_config
from .lazy import quantize_from_disk
from .loading import load
from .qlinear import QLinear
from .saving import load_quantized, save_quantized

__all__ = [
    "load", "load_default", "DEFAULT_MODEL", "quantize_model", "quantize_from_disk", "QuantizeResult",
    "BlockResult", "save_quantized", "load_quantized", "Checkpoint", "CheckpointWriter", "QLinear",
    "Family", "family_for", "block_structure", "supported_model_types", "to_llama_config",
]
