"""`save_quantized` / `load_quantized`: a quantized model to a checkpoint folder and back.

The checkpoint stores integer codes and scales (not the dequantized weights) for every linear
the recipe rounded (packed binarized / mixed-precision layouts for BiLLM and SliM-LLM); loading dequantizes them with the same `qnpu.qcore.dequantize`, so the
reloaded model is bit-identical to the one that was saved. See `qnpu.models.checkpoint`.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from qnpu.transforms import QTransform, recipe_to_dict

from .checkpoint import Checkpoint, CheckpointWriter, damaged, one_line
from .engine import is_out_of_memory
from .families import PANGU_MODEL_TYPES, family_for, to_llama_config
from .qlinear import QLinear
from .results import QuantizeResult


def _edge_tensors(result: QuantizeResult) -> dict[str, torch.Tensor]:
    if result.model is None:
        return dict(result.edges)
    layers = family_for(result.model.config).layers + "."
    state = result.model.state_dict()
    tensors = {k: v for k, v in state.items() if not k.startswith(layers)}
    head = family_for(result.model.config).lm_head + ".weight"
    if getattr(result.model.config, "tie_word_embeddings", False):
        tensors.pop(head, None)  # tied: rebuilt from the embedding on load
    return tensors


def save_quantized(result: QuantizeResult, path: str | os.PathLike, *, source: dict,
                   recipe: QTransform | dict, report: dict | None = None, overwrite: bool = False,
                   tokenizer=None) -> Path:
    """Write ``result`` (from `quantize_model`) to ``path``, atomically (see `CheckpointWriter`).

    source: the model's identity (e.g. name, path, sha256 of its weights); report: anything
    worth keeping next to the weights (perplexities, timings); tokenizer: saved alongside so the
    checkpoint loads on its own."""
    recipe_dict = recipe_to_dict(recipe) if isinstance(recipe, QTransform) else recipe
    with CheckpointWriter(path, source=source, recipe=recipe_dict, hf_config=result.config,
                          overwrite=overwrite) as writer:
        for block in result.blocks:
            writer.add(*block.checkpoint_payload())
        writer.add(_edge_tensors(result))
        if tokenizer is not None:
            tokenizer.save_pretrained(writer.tmp)
        return writer.close(extra={"report": report or {}})


def load_quantized(path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild the quantized model saved at ``path`` (linears become `QLinear`).

    The returned model carries the checkpoint's metadata as ``model.qnpu_checkpoint``. A damaged
    checkpoint is refused in one line naming the file (`Checkpoint`), also when its tensors do not
    fit the model its ``config.json`` describes (names, shapes, dtypes)."""
    ckpt = Checkpoint(path)
    model, config = _build(ckpt)
    if dtype is not None:
        model = model.to(dtype)
    floats = ckpt.float_tensors()
    _check_fit(ckpt, model, floats)
    missing, unexpected = model.load_state_dict(floats, strict=False)
    qlinears = ckpt.qlinears()
    rebuilt = {f"{label}.weight" for label, info in qlinears.items() if info["qweight"] is not None}
    head = family_for(config).lm_head + ".weight"
    allowed = rebuilt | ({head} if getattr(config, "tie_word_embeddings", False) else set())
    missing = sorted(set(missing) - allowed)
    if unexpected:
        file = ckpt.files[unexpected[0]]
        raise damaged(file, f"holds tensors the model of {ckpt.config_file} has no place for: {_few(unexpected)}")
    if missing:
        raise damaged(ckpt.config_file, f"its model needs tensors no shard holds: {_few(missing)}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    for label, info in qlinears.items():
        old = _linear(ckpt, model, label)
        q = info["qweight"]
        if q is not None and tuple(q.shape) != tuple(old.weight.shape):
            raise damaged(ckpt._where(label), f"quantized linear {label}: codes have shape {tuple(q.shape)}, "
                                                        f"the model of {ckpt.config_file.name} needs "
                                                        f"{tuple(old.weight.shape)}")
        weight = old.weight.detach() if q is None else q.dequantize()
        new = QLinear(weight.to(old.weight.dtype), None if old.bias is None else old.bias.detach(), qweight=q,
                      act_spec=info["act_spec"], act_qparams=info["act_qparams"],
                      online_hadamard=info["online_hadamard"])
        parent, _, child = label.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    model.eval()
    model.qnpu_checkpoint = ckpt.meta
    return model


def _few(names) -> str:
    names = sorted(names)
    return ", ".join(names[:5]) + (f", ... ({len(names) - 5} more)" if len(names) > 5 else "")


def _build(ckpt: Checkpoint):
    """The (random) model and config the checkpoint's ``config.json`` describes; whatever
    transformers raises on a damaged config becomes one line naming the file."""
    import transformers

    try:
        hf = dict(ckpt.hf_config)
        if hf.get("model_type") in PANGU_MODEL_TYPES:  # streamed from disk: the raw openPangu config
            config = to_llama_config(hf)
        else:
            if not isinstance(hf.get("model_type"), str):
                raise ValueError("'model_type' is missing")
            config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
        family_for(config)
        return transformers.AutoModelForCausalLM.from_config(config), config
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as err:  # noqa: BLE001 - transformers' errors on bad config values are of any type
        if is_out_of_memory(err):
            raise
        raise damaged(ckpt.config_file, f"no model can be built from it ({type(err).__name__}: "
                                        f"{one_line(err)})") from None


def _check_fit(ckpt: Checkpoint, model: nn.Module, floats: dict[str, torch.Tensor]) -> None:
    """Every float tensor has the shape of the model's tensor of that name, and is floating point
    where the model's is (load_state_dict would raise a multi-line RuntimeError, or cast silently)."""
    state = model.state_dict()
    for name, t in floats.items():
        want = state.get(name)
        if want is None:
            continue
        if tuple(t.shape) != tuple(want.shape):
            raise damaged(ckpt.files[name], f"tensor {name} has shape {tuple(t.shape)}, the model of "
                                            f"{ckpt.config_file.name} needs {tuple(want.shape)}")
        if want.is_floating_point() and not t.is_floating_point():
            raise damaged(ckpt.files[name], f"tensor {name} is {str(t.dtype).removeprefix('torch.')}, not a "
                                            "floating-point dtype")


def _linear(ckpt: Checkpoint, model: nn.Module, label: str) -> nn.Linear:
    try:
        module = model.get_submodule(label)
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear):
        raise damaged(ckpt.meta_file, f"quantized linear {label} is not a linear of the model of "
                                      f"{ckpt.config_file.name}")
    return module
