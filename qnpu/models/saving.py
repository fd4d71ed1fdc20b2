"""`save_quantized` / `load_quantized`: a quantized model to a checkpoint folder and back.

The checkpoint stores integer codes and scales (not the dequantized weights) for every linear
the recipe rounded; loading dequantizes them with the same `qnpu.qcore.dequantize`, so the
reloaded model is bit-identical to the one that was saved. See `qnpu.models.checkpoint`.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from qnpu.transforms import QTransform, recipe_to_dict

from .checkpoint import Checkpoint, CheckpointWriter
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

    The returned model carries the checkpoint's metadata as ``model.qnpu_checkpoint``."""
    import transformers

    ckpt = Checkpoint(path)
    hf = dict(ckpt.hf_config)
    if hf.get("model_type") in PANGU_MODEL_TYPES:  # streamed from disk: the raw openPangu config
        config = to_llama_config(hf)
    else:
        config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    model = transformers.AutoModelForCausalLM.from_config(config)
    if dtype is not None:
        model = model.to(dtype)
    floats = ckpt.float_tensors()
    missing, unexpected = model.load_state_dict(floats, strict=False)
    qlinears = ckpt.qlinears()
    rebuilt = {f"{label}.weight" for label, info in qlinears.items() if info["qweight"] is not None}
    head = family_for(config).lm_head + ".weight"
    allowed = rebuilt | ({head} if getattr(config, "tie_word_embeddings", False) else set())
    problems = sorted(set(missing) - allowed) + sorted(unexpected)
    if problems:
        raise ValueError(f"{path}: checkpoint does not match its config; missing/unexpected tensors: {problems[:8]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    for label, info in qlinears.items():
        old = model.get_submodule(label)
        q = info["qweight"]
        weight = old.weight.detach() if q is None else q.dequantize()
        new = QLinear(weight.to(old.weight.dtype), None if old.bias is None else old.bias.detach(), qweight=q,
                      act_spec=info["act_spec"], act_qparams=info["act_qparams"],
                      online_hadamard=info["online_hadamard"])
        parent, _, child = label.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    model.eval()
    model.qnpu_checkpoint = ckpt.meta
    return model
