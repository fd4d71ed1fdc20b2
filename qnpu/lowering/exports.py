"""`export(model, path, format)`: a quantized model as a folder a serving stack loads.

Formats: ``"ascend-v1"`` (msModelSlim's AscendV1 for vllm-ascend / MindIE, see `ascend_v1`) and
``"compressed-tensors"`` (llm-compressor's format for vLLM and transformers, see `compressed_tensors`).
Every layer is checked before anything is written; the folder is built under a temporary name and
renamed into place, so a failed export leaves no folder at ``path`` (docs/architecture.md, "Exports").
"""
from __future__ import annotations

import os
from pathlib import Path

from .ascend_v1 import ascend_v1_state, write_ascend_v1
from .compressed_tensors import compressed_tensors_state, write_compressed_tensors
from .folders import atomic_folder, check_output

FORMATS = ("ascend-v1", "compressed-tensors")


def export(model, path: str | os.PathLike, format: str = "ascend-v1", *, tokenizer=None,
           overwrite: bool = False) -> Path:
    """Write quantized ``model`` (from `quantize_model` / `load_quantized`) to ``path`` in ``format``."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is not supported; allowed: {' | '.join(FORMATS)}")
    check_output(path, overwrite)
    if format == "compressed-tensors":
        state = compressed_tensors_state(model)  # refuses what the format cannot express, before any file exists
        with atomic_folder(path, overwrite) as tmp:
            write_compressed_tensors(model, tmp, tokenizer, state=state)
        return Path(path)
    state = ascend_v1_state(model)  # refuses what the format cannot express, before any file exists
    with atomic_folder(path, overwrite) as tmp:
        write_ascend_v1(model, tmp, tokenizer, state=state)
    return Path(path)
