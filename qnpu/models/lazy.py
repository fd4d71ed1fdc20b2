"""Streaming quantization of a model on disk that does not fit in memory.

`quantize_from_disk` builds the model skeleton on the meta device (accelerate's
``init_empty_weights``: parameters take no memory), loads only the embedding from the safetensors
files, captures layer 0's inputs, then for each block materializes *only that block* from disk,
runs the engine's per-block step (the same `LayerwiseCalibration.step` as `quantize_model`),
hands the `BlockResult` to ``on_block`` (e.g. to write it into a ``CheckpointWriter``) and frees
the block again. Peak memory is about one block (plus its calibration statistics) + the hidden
states of the calibration set + the embedding; the final norm and lm_head are read at the end.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from torch import nn

from qnpu.transforms import QTransform

from .engine import ERROR_SAMPLE, LayerwiseCalibration, naming_out_of_memory, progress_bar
from .results import BlockResult, QuantizeResult
from .families import block_structure, family_for, hf_config
from .loading import missing_tensors_error
from .qlinear import QLinear

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@contextlib.contextmanager
def _weight_file(path: Path):
    """safetensors' error on a damaged weight file (truncated, empty, a header that is not valid
    JSON or does not match the file's size) as one ValueError naming the file."""
    try:
        yield
    except SafetensorError as err:
        raise ValueError(f"weight file {path} is damaged ({' '.join(str(err).split())}): download or convert "
                         "it again") from None


def _weight_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a sharded folder's index file (tensor name -> file name)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not (isinstance(weight_map, dict) and all(isinstance(f, str) for f in weight_map.values())):
            raise TypeError("weight_map is not an object of file names")
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"weight index {index} is damaged ({type(err).__name__}: {err}): download it "
                         "again") from None
    return weight_map


class SafetensorsIndex:
    """Tensor name -> file of a safetensors checkpoint folder (sharded index, single file, or any
    ``*.safetensors`` files), with loads grouped by file. A damaged file or index is a ValueError
    naming it."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            self.files = {name: self.folder / f for name, f in _weight_map(index).items()}
        else:
            paths = [self.folder / SINGLE_FILE] if (self.folder / SINGLE_FILE).is_file() else \
                sorted(self.folder.glob("*.safetensors"))
            if not paths:
                raise FileNotFoundError(f"{self.folder} holds no safetensors checkpoint ({INDEX_FILE}, "
                                        f"{SINGLE_FILE} or *.safetensors)")
            self.files = {}
            for p in paths:
                with _weight_file(p), safe_open(str(p), framework="pt") as f:
                    self.files.update({name: p for name in f.keys()})

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors (CPU), each file opened once."""
        missing = [n for n in names if n not in self.files]
        if missing:
            raise KeyError(f"{self.folder}: the checkpoint lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        for path, group in by_file.items():
            with _weight_file(path), safe_open(str(path), framework="pt") as f:
                for n in group:
                    out[n] = f.get_tensor(n)
        return out


def materialize(module: nn.Module, prefix: str, index: SafetensorsIndex) -> None:
    """Replace every meta parameter / buffer of ``module`` by its tensor from disk (in the dtype
    the skeleton declares), named ``prefix + "." + name``."""
    meta = [(n, t) for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    loaded = index.load([f"{prefix}.{n}" for n, _ in meta])
    for name, t in meta:
        value = loaded[f"{prefix}.{name}"].to(t.dtype)
        if value.shape != t.shape:  # assigned as is, it would fail deep in a forward pass
            raise ValueError(f"weight file {index.files[f'{prefix}.{name}']}: tensor {prefix}.{name} has shape "
                             f"{tuple(value.shape)}, its config.json needs {tuple(t.shape)}: the file does not "
                             "belong to this config, or is damaged")
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
        else:
            owner._buffers[leaf] = value


def release(block: nn.Module) -> None:
    """Drop a block's tensors (back to meta) once it is written."""
    for m in block.modules():
        if isinstance(m, QLinear):
            m.qweight, m.act_qparams = None, None
    block.to("meta")


def _config_dtype(config: dict) -> torch.dtype:
    name = config.get("torch_dtype") or config.get("dtype") or "float32"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"config.json has an unknown dtype {name!r}")
    return dtype


def quantize_from_disk(path: str | os.PathLike, recipe: QTransform, calibration_ids: torch.Tensor, *,
                       on_block: Callable[[BlockResult], None], device="cpu", batch_size: int = 8,
                       progress: bool = True, max_stat_tokens: int = 2048, block_input_sample: int = 4,
                       error_tokens: int = 128, float_path: bool | None = None, recipe_device=None,
                       hessian: bool | None = None, dtype: torch.dtype | None = None, data_free: bool | None = None,
                       error_sample: tuple[int, int] = ERROR_SAMPLE,
                       true_sequential: bool | None = None, forward_dtype: torch.dtype | None = None) -> QuantizeResult:
    """Quantize the HF checkpoint folder ``path`` (``config.json`` + safetensors) block by block
    without loading it whole; same arguments and per-block results as `quantize_model`.

    ``on_block`` receives each `BlockResult` with its params, quantized weights and state; the
    returned result's blocks keep only specs, errors and timings (``params``, ``qweights``,
    ``act_qparams`` and ``state`` are dropped to free memory), ``model`` is None, ``edges`` holds
    the embedding / final norm / lm_head tensors to save (rotated when the recipe rotates), and
    ``config`` the ``config.json`` dict (untied when rotated). ``dtype``: the compute dtype
    (default: the config's ``torch_dtype``).
    """
    start = time.perf_counter()
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    family, structure = family_for(config), block_structure(config)
    cfg = hf_config(config)
    dtype = dtype or _config_dtype(config)
    index = SafetensorsIndex(path)
    import transformers

    # transformers 5 renamed from_config's torch_dtype to dtype
    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(cfg, **{dtype_key: dtype})
    model.eval()
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    head = f"{family.lm_head}.weight"
    missing = [n for n in model.state_dict() if n not in index and not (tied and n == head)]
    if missing:  # refused before any block is quantized (and never a KeyError half-way)
        raise missing_tensors_error(path, missing)
    materialize(model.get_submodule(family.embed), family.embed, index)
    run = LayerwiseCalibration(recipe, family, structure, device=device, batch_size=batch_size,
                               max_stat_tokens=max_stat_tokens, block_input_sample=block_input_sample,
                               error_tokens=error_tokens, float_path=float_path, recipe_device=recipe_device,
                               hessian=hessian, data_free=data_free, error_sample=error_sample,
                               true_sequential=true_sequential, forward_dtype=forward_dtype)
    run.capture(model, calibration_ids)
    layers = model.get_submodule(family.layers)
    blocks = []
    with progress_bar(len(layers), progress) as bar:
        for i, block in enumerate(layers):
            with naming_out_of_memory(lambda: run.oom_where(f"reading block {i}", i)):
                materialize(block, f"{family.layers}.{i}", index)
            result = run.step(block, i)
            with naming_out_of_memory(lambda: run.oom_where(f"writing block {i}", i)):
                on_block(result)
            blocks.append(dataclasses.replace(result, params={}, qweights={}, act_qparams={}, state=None))
            del result
            release(block)
            bar.set_postfix(error=f"{blocks[-1].output_error:.3g}")
            bar.update()
    names = [f"{family.final_norm}.weight"] + ([] if tied else [head])
    with naming_out_of_memory(lambda: run.oom_where(f"reading {' and '.join(names)} from {path}")):
        loaded = index.load(names)
    embed = model.get_submodule(family.embed).weight.detach()
    edges = run.edges(embed, loaded[names[0]].to(dtype), None if tied else loaded[names[1]].to(dtype))
    if run.rotation is not None:
        config = {**config, "tie_word_embeddings": False}
    return QuantizeResult(model=None, blocks=blocks, seconds=time.perf_counter() - start,
                          rotated=run.rotation is not None, edges=edges, config=config,
                          data_free=run.data_free, error_sample_tokens=run.error_sample_tokens,
                          true_sequential=run.sequential)
