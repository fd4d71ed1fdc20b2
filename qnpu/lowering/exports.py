"""`export(model, path, format)`: a quantized model as a folder a serving stack loads.

Formats: ``"ascend-v1"`` (msModelSlim's AscendV1 for vllm-ascend / MindIE, see `ascend_v1`) and
``"compressed-tensors"`` (llm-compressor's format for vLLM and transformers, see `compressed_tensors`).
Every layer is checked before anything is written; the folder is built under a temporary name and
renamed into place, so a failed export leaves no folder at ``path`` (docs/architecture.md, "Exports").

Every export's ``config.json`` carries ``"qnpu_export": {"format": ..., "qnpu_version": ...}``
(`MARKER`): the folder was written by qnpu, so ``qnpu export --overwrite`` / ``qnpu quantize
--overwrite`` may replace it (`is_export`). Loaders ignore the key.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import qnpu

from .ascend_v1 import ascend_v1_state, write_ascend_v1
from .compressed_tensors import compressed_tensors_state, write_compressed_tensors
from .folders import atomic_folder, check_output

FORMATS = ("ascend-v1", "compressed-tensors")
MARKER = "qnpu_export"  # the key in an export's config.json that says qnpu wrote the folder


def _mark(folder: Path, format: str) -> None:
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config[MARKER] = {"format": format, "qnpu_version": qnpu.__version__}
    config_file.write_text(json.dumps(config, indent=2))


def is_export(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder `export` wrote (its config.json carries `MARKER`)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get(MARKER), dict)


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
            _mark(tmp, format)
        return Path(path)
    state = ascend_v1_state(model)  # refuses what the format cannot express, before any file exists
    with atomic_folder(path, overwrite) as tmp:
        write_ascend_v1(model, tmp, tokenizer, state=state)
        _mark(tmp, format)
    return Path(path)
