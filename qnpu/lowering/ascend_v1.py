"""msModelSlim's AscendV1 format (vllm-ascend ``--quantization ascend``, MindIE): write and read.

A folder holds ``quant_model_description.json`` (every written tensor typed: ``"W8A8"``,
``"W8A8_DYNAMIC"``, ``"W8A16"``, ``"W4A8_DYNAMIC"`` or ``"FLOAT"``, plus ``model_quant_type``,
``version``, ``group_size``, ``metadata``, ``optional``), ``quant_model_weights.safetensors``
(sharded with ``quant_model_weights.safetensors.index.json`` above a size threshold),
``config.json`` without ``quantization_config`` and the tokenizer files. Per linear ``<p>``
(weights ``[out, in]``; matches msModelSlim 26.1.0's own exports, tests/fixtures/msmodelslim):

=============== ==========================================================================
W8A8            ``weight`` int8; ``input_scale``, ``input_offset`` [1] (model dtype);
                ``quant_bias`` int32 [out] = ``rint(bias / deq_scale - sum_in(W) * input_offset)``;
                ``deq_scale`` [out] = ``input_scale * weight_scale``: fp32 for bf16 models, else
                int64 holding the fp32 bits; the float ``bias`` is also written, as FLOAT
W8A8_DYNAMIC    ``weight`` int8; ``weight_scale``, ``weight_offset`` fp32 [out, 1]; ``bias`` FLOAT
W8A16           ``weight`` int8; ``weight_scale``, ``weight_offset`` fp32 [out, 1] or
                [out, in/g] (``group_size`` g); ``w = (weight - weight_offset) * weight_scale``
W4A8_DYNAMIC    ``weight`` int8 [out/2, in], two int4 along out (``pack_int4_pairs``);
                ``weight_scale`` fp32 [out, 1]; ``weight_offset`` zeros; ``scale_bias`` fp32
                ``8 * sum_in(W * weight_scale)``: [out, 1], or [out, 16] over 16 chunks of in for
                o_proj / down_proj (row-parallel)
=============== ==========================================================================
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qnpu.qcore import pack_int4_pairs

from .encodings import _f32_bits, decode_deq_scale, encode_deq_scale
from .schemes import LoweringError, _weight_rows, classify, float_tensors, is_quantized_linear, quantized_layers

DESCRIPTION = "quant_model_description.json"
WEIGHTS = "quant_model_weights.safetensors"
SHARD_BYTES = 4 * 2**30
TYPES = ("W8A8", "W8A8_DYNAMIC", "W8A16", "W4A8_DYNAMIC")
ROW_PARALLEL = ("o_proj", "down_proj")


def _layer_type(label: str, m) -> str:
    scheme = classify(label, m)
    if m.online_hadamard:
        raise LoweringError(f"{label}: an online Hadamard rotation cannot be written to AscendV1 (vllm-ascend applies "
                            "no rotation); use hadamard_rotation(online=False)")
    q = m.qweight
    if scheme == "W4A16" or (scheme == "W8A16" and q.spec.bits != 8):
        raise LoweringError(f"{label}: {q.spec.bits}-bit weight-only layers have no AscendV1 type here "
                            "(W8A16 takes int8 weights); export W8A16 or W4A8_DYNAMIC")
    if scheme == "W4A8_DYNAMIC" and q.spec.granularity == "group":
        raise LoweringError(f"{label}: per-group W4A8 is not written to AscendV1 by this exporter; use per-channel")
    return scheme


def _zero_offset(rows: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(rows, dtype=torch.float32)


def layer_tensors(label: str, m, kind: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The AscendV1 tensors of quantized linear ``m`` (``label`` is its HF prefix), without the bias."""
    q = m.qweight
    scale, zp, _ = _weight_rows(q)
    scale = scale.detach().to(torch.float32)
    codes = q.codes
    if kind == "W8A8":
        in_scale, in_zp = m.act_qparams
        in_scale = in_scale.reshape(1).to(torch.float32).to(dtype)
        offset = torch.zeros(1) if in_zp is None else in_zp.reshape(1).to(torch.float32)
        deq = in_scale.to(torch.float32) * scale.to(dtype).to(torch.float32).reshape(-1)
        applied = deq if dtype == torch.bfloat16 else decode_deq_scale(encode_deq_scale(deq))[0]
        bias = torch.zeros(codes.shape[0]) if m.bias is None else m.bias.detach().to(torch.float32)
        quant_bias = torch.round(bias / applied - codes.to(torch.float32).sum(1) * offset).to(torch.int32)
        return {"weight": codes.to(torch.int8), "input_scale": in_scale, "input_offset": offset.to(dtype),
                "quant_bias": quant_bias, "deq_scale": deq if dtype == torch.bfloat16 else _f32_bits(deq)}
    if kind in ("W8A8_DYNAMIC", "W8A16"):
        weight, offset = codes.to(torch.int32), _zero_offset(scale) if zp is None else zp.to(torch.float32)
        if q.spec.format == "uint":   # msModelSlim's signed frame: (w - 128) - (zp - 128)
            weight, offset = weight - 128, offset - 128
        return {"weight": weight.to(torch.int8), "weight_scale": scale, "weight_offset": offset}
    w = codes.to(torch.float32) * scale                                     # W4A8_DYNAMIC
    chunks = 16 if label.rsplit(".", 1)[-1] in ROW_PARALLEL else 1
    if codes.shape[1] % chunks:
        raise LoweringError(f"{label}: in={codes.shape[1]} does not split into {chunks} chunks for scale_bias")
    scale_bias = 8.0 * w.reshape(w.shape[0], chunks, -1).sum(-1)
    return {"weight": pack_int4_pairs(codes), "weight_scale": scale, "weight_offset": _zero_offset(scale),
            "scale_bias": scale_bias}


def _group_size(layers: dict) -> int:
    sizes = {m.qweight.spec.group_size for m in layers.values() if m.qweight.spec.granularity == "group"}
    if len(sizes) > 1:
        raise LoweringError(f"AscendV1 has one group_size per model; the layers use {sorted(sizes)}")
    return sizes.pop() if sizes else 0


def ascend_v1_state(model) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, description)`` of ``model`` in AscendV1; raises `LoweringError` before building any."""
    layers = quantized_layers(model)
    kinds = {label: _layer_type(label, m) for label, m in layers.items()}
    dtype = next(iter(layers.values())).weight.dtype
    group = _group_size(layers)
    tensors, desc = {}, {}
    for label, m in layers.items():
        for name, t in layer_tensors(label, m, kinds[label], dtype).items():
            tensors[f"{label}.{name}"] = t.contiguous()
            desc[f"{label}.{name}"] = kinds[label]
    floats = float_tensors(model, layers, dtype)
    tensors.update(floats)
    desc.update(dict.fromkeys(floats, "FLOAT"))
    counts = {k: sum(1 for v in kinds.values() if v == k) for k in TYPES if k in kinds.values()}
    main = max(counts, key=counts.get)
    desc.update({"model_quant_type": main, "version": "1.0.0", "group_size": group,
                 "metadata": {"producer": "qnpu", "layer_types": counts}, "optional": {}})
    return tensors, desc


def write_ascend_v1(model, folder: Path, tokenizer=None, shard_bytes: int = SHARD_BYTES, state=None) -> None:
    """Write ``model`` into the (empty) ``folder`` as AscendV1 (``state``: `ascend_v1_state` if already built)."""
    tensors, desc = state or ascend_v1_state(model)
    shards, current, size = [], {}, 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key], size = t, size + nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(folder / WEIGHTS), metadata={"format": "pt"})
    else:
        names = [f"quant_model_weights-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map = {}
        for name, shard in zip(names, shards):
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (folder / f"{WEIGHTS}.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1))
    (folder / DESCRIPTION).write_text(json.dumps(desc, indent=4))
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["torch_dtype"] = str(_model_dtype(model)).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def _model_dtype(model) -> torch.dtype:
    return next(m.weight.dtype for m in model.modules() if is_quantized_linear(m))


def read_ascend_v1(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """``(tensors, description, config)`` of an AscendV1 folder, checked for consistency."""
    path = Path(path)
    for name in (DESCRIPTION, "config.json"):
        if not (path / name).is_file():
            raise ValueError(f"{path} is not an AscendV1 export: {name} is missing")
    desc = json.loads((path / DESCRIPTION).read_text())
    index = path / f"{WEIGHTS}.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [WEIGHTS]
    tensors = {}
    for f in files:
        if not (path / f).is_file():
            raise ValueError(f"{path}: weight file {f} is missing")
        try:
            tensors.update(load_file(str(path / f)))
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise ValueError(f"{path / f}: unreadable safetensors ({exc})") from None
    meta = {"model_quant_type", "version", "group_size", "metadata", "optional"}
    missing = sorted(k for k in desc if k not in meta and k not in tensors)
    if missing:
        raise ValueError(f"{path}: {DESCRIPTION} lists tensors that are not in the weights: {missing[:5]}")
    untyped = sorted(k for k in tensors if k not in desc)
    if untyped:
        raise ValueError(f"{path}: tensors without a type in {DESCRIPTION}: {untyped[:5]}")
    return tensors, desc, json.loads((path / "config.json").read_text())
