"""`load_ascend_v1`: an AscendV1 folder (qnpu's or msModelSlim's export) as a lowered model.

Each quantized linear becomes the lowered module vllm-ascend would run for its type, built from
the stored tensors as vllm-ascend loads them (scales rounded to the model dtype; W8A8 uses the
stored ``quant_bias`` and ``deq_scale``); every other tensor is loaded into the Hugging Face model
built from ``config.json``. Missing, untyped, misshapen or mistyped tensors are errors naming the
tensor. See docs/architecture.md, "Exports".
"""
from __future__ import annotations

import os

import torch

from qnpu.qcore import unpack_int4_pairs

from .ascend_v1 import TYPES, read_ascend_v1
from .encodings import _f32_bits, decode_deq_scale
from .lower import TARGETS
from .modules import W8A8DynamicLinear, W8A8StaticLinear, WeightOnlyLinear
from .schemes import LoweringError, _in_dtype, build_w4a8_codes

NEEDS = {"W8A8": ("weight", "input_scale", "input_offset", "quant_bias", "deq_scale"),
         "W8A8_DYNAMIC": ("weight", "weight_scale", "weight_offset"),
         "W8A16": ("weight", "weight_scale", "weight_offset"),
         "W4A8_DYNAMIC": ("weight", "weight_scale", "weight_offset")}


def _get(tensors, key, dtype=None, shape=None):
    t = tensors[key]
    if dtype is not None and t.dtype not in (dtype if isinstance(dtype, tuple) else (dtype,)):
        raise ValueError(f"{key}: dtype {t.dtype}, expected {dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{key}: shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t


def _common(label, out, k, dtype):
    return dict(label=label, in_features=k, out_features=out, dtype=dtype)


def _bias(tensors, label, dtype, bias_dtype=torch.float32):
    b = tensors.get(f"{label}.bias")
    return None if b is None else _in_dtype(b, dtype).to(bias_dtype)


def _w8a8(label, t, dtype, out, k):
    p = f"{label}."
    scale = _get(t, p + "input_scale", shape=(1,)).to(torch.float32)
    offset = _get(t, p + "input_offset", shape=(1,)).to(torch.float32)
    deq = _get(t, p + "deq_scale", (torch.int64, torch.float32), shape=(out,))
    if dtype == torch.bfloat16:
        deq = decode_deq_scale(deq)[0] if deq.dtype == torch.int64 else deq
    elif deq.dtype == torch.float32:
        deq = _f32_bits(deq)
    scale_d = _in_dtype(scale, dtype)
    return W8A8StaticLinear(weight=t[p + "weight"].t().contiguous(), input_scale_recip=(1.0 / scale_d).to(dtype),
                            input_offset=offset.to(dtype), quant_bias=_get(t, p + "quant_bias", torch.int32, (out,)),
                            deq_scale=deq, **_common(label, out, k, dtype))


def _rows(t, label, out):
    scale = _get(t, f"{label}.weight_scale").to(torch.float32)
    offset = _get(t, f"{label}.weight_offset", shape=tuple(scale.shape)).to(torch.float32)
    if scale.dim() != 2 or scale.shape[0] != out:
        raise ValueError(f"{label}.weight_scale: shape {tuple(scale.shape)}, expected ({out}, 1) or ({out}, groups)")
    return scale, offset


def _dynamic(label, t, dtype, out, k):
    scale, offset = _rows(t, label, out)
    if scale.shape[1] != 1 or bool(offset.ne(0).any()):
        raise LoweringError(f"{label}: W8A8_DYNAMIC needs per-channel scales and a zero weight_offset")
    w_scale = _in_dtype(scale.reshape(-1), dtype)
    return W8A8DynamicLinear(weight=t[f"{label}.weight"].t().contiguous(),
                             weight_scale=w_scale if dtype == torch.bfloat16 else w_scale.to(torch.float32),
                             bias=_bias(t, label, dtype), **_common(label, out, k, dtype))


def _w8a16(label, t, dtype, out, k, group):
    scale, offset = _rows(t, label, out)
    g = 0 if scale.shape[1] == 1 else group
    if g and scale.shape[1] * g != k:
        raise ValueError(f"{label}.weight_scale: {scale.shape[1]} groups of group_size {g} do not cover in={k}")
    anti_offset = None if not bool(offset.ne(0).any()) else _in_dtype(-offset.t().contiguous(), dtype)
    return WeightOnlyLinear(weight=t[f"{label}.weight"].t().contiguous(), antiquant_scale=_in_dtype(
        scale.t().contiguous(), dtype), antiquant_offset=anti_offset, group_size=g, scheme="W8A16",
        bias=_bias(t, label, dtype, torch.float16 if dtype == torch.float16 else torch.float32),
        **_common(label, out, k, dtype))


def _w4a8(label, t, dtype, out, k):
    scale, offset = _rows(t, label, out)
    if scale.shape[1] != 1 or bool(offset.ne(0).any()):
        raise LoweringError(f"{label}: W4A8_DYNAMIC is read with per-channel scales and a zero weight_offset")
    codes = unpack_int4_pairs(t[f"{label}.weight"])
    return build_w4a8_codes(label, codes, scale, t.get(f"{label}.bias"), dtype)


def load_ascend_v1(path: str | os.PathLike, target: str = "reference", *, dtype: torch.dtype | None = None):
    """The AscendV1 export at ``path`` as a lowered Hugging Face model for ``target``.

    ``dtype`` (default: ``config.json``'s ``torch_dtype``) sets the activations' dtype and the
    scale rounding. Works for qnpu's exports and msModelSlim's."""
    import transformers

    if target not in TARGETS:
        raise LoweringError(f"target={target!r} does not exist; allowed: {' | '.join(sorted(TARGETS))}")
    tensors, desc, config_dict = read_ascend_v1(path)
    config = transformers.AutoConfig.for_model(**config_dict)
    dtype = dtype or getattr(torch, str(config_dict.get("torch_dtype") or "float32"))
    typed = {k: v for k, v in desc.items() if k in tensors}
    unknown = sorted({v for v in typed.values() if v not in TYPES + ("FLOAT",)})
    if unknown:
        raise LoweringError(f"{path}: layer types {unknown} are not supported; allowed: {', '.join(TYPES)}, FLOAT")
    layers = sorted({k.rsplit(".", 1)[0] for k, v in typed.items() if v in TYPES})
    built = {}
    for label in layers:
        kind = desc[f"{label}.weight"]
        missing = [f"{label}.{n}" for n in NEEDS[kind] if f"{label}.{n}" not in tensors]
        if missing:
            raise ValueError(f"{path}: {kind} layer {label} lacks {missing}")
        w = _get(tensors, f"{label}.weight", torch.int8)
        out, k = (w.shape[0] * 2, w.shape[1]) if kind == "W4A8_DYNAMIC" else tuple(w.shape)
        built[label] = (_w8a8(label, tensors, dtype, out, k) if kind == "W8A8" else
                        _dynamic(label, tensors, dtype, out, k) if kind == "W8A8_DYNAMIC" else
                        _w8a16(label, tensors, dtype, out, k, int(desc.get("group_size") or 0)) if kind == "W8A16" else
                        _w4a8(label, tensors, dtype, out, k))
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    for label, module in built.items():
        parent, _, child = label.rpartition(".")
        setattr(model.get_submodule(parent), child, module)
    floats = {k: v.to(dtype) for k, v in tensors.items() if desc.get(k) == "FLOAT" and not k.startswith(
        tuple(f"{label}." for label in built))}
    expected = {k for k in model.state_dict() if not k.startswith(tuple(f"{label}." for label in built))}
    if getattr(config, "tie_word_embeddings", False):
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(floats))
    if missing:
        raise ValueError(f"{path}: tensors missing from the export: {missing[:5]}")
    extra = sorted(set(floats) - expected)
    if extra:
        raise ValueError(f"{path}: tensors the model has no place for: {extra[:5]}")
    state = model.state_dict()
    for key, value in floats.items():
        if tuple(value.shape) != tuple(state[key].shape):
            raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}; config.json implies {tuple(state[key].shape)}")
    model.load_state_dict(floats, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    if target != "reference":
        TARGETS[target].prepare()
    return model.eval()
