"""compressed-tensors (llm-compressor's checkpoint format, loaded by vLLM and transformers): write.

A folder holds ``config.json`` (the model config plus ``quantization_config``), ``model.safetensors``
and the tokenizer files. Verified against compressed-tensors 0.20.0 with transformers 5.24.0
(tests/lowering/test_compressed_tensors.py loads our exports with the library). Per linear ``<p>``
(weights ``[out, in]``; scales in the model dtype, ``[out, 1]`` per channel or ``[out, in/g]``):

================  ============================================================================
W8A8_DYNAMIC      format ``int-quantized``: ``weight`` int8 codes, ``weight_scale``; weights
                  channel symmetric int8, inputs dynamic per-token symmetric int8
W8A16, W4A16      format ``pack-quantized``: ``weight_packed`` int32 ``[out, ceil(in*b/32)]``,
                  ``weight_scale``, ``weight_shape`` int64 ``[out, in]`` and, asymmetric only,
                  ``weight_zero_point`` int32 ``[ceil(out*b/32), groups]`` (packed along ``out``);
                  ``b`` is the container width, 8 for 5-8-bit weights and 4 for 1-4-bit ones
================  ============================================================================

``w = (q - zero_point) * weight_scale``, ``q`` and ``zero_point`` signed in ``[-2^(b-1), 2^(b-1))``
(unsigned codes move into that frame: ``q - 2^(b-1)``, ``zero_point - 2^(b-1)``; a symmetric spec
stores ``q - zero_point`` and no zero point). Packing adds ``2^(b-1)`` and places value ``i`` of a
row at bits ``[b*i, b*i + b)`` of its little-endian bit stream, ``32 / b`` per int32 word (the
library's ``pack_to_int32``; vLLM reads these as ``uint4b8`` / ``uint8b128``). Bias, norms,
embeddings and ``lm_head`` are stored unquantized in the model dtype; every unquantized ``Linear``
(``lm_head``) is in the ``ignore`` list; a tied ``lm_head`` is not written. Layers sharing one
scheme form one config group targeting ``"Linear"``; several schemes get one group each, targeting
the layer names, with format ``mixed-precision`` when their formats differ (else the one format).
Refused before anything is written, naming the layer: static activations, W4A8, online Hadamard
rotations, BiLLM / SliM-LLM and layers without integer codes.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from qnpu.qcore import QTensor, pack_bits, unpack_bits

from .schemes import LoweringError, _packed_kind, _weight_rows, classify, float_tensors, is_quantized_linear, quantized_layers

WEIGHTS = "model.safetensors"
CT_VERSION = "0.20.0"          # the compressed-tensors release these files are checked against
SCHEME_FORMATS = {"W8A8_DYNAMIC": "int-quantized", "W8A16": "pack-quantized", "W4A16": "pack-quantized"}


def pack_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Signed ``bits``-bit ``codes`` (2-d) -> int32 along ``dim``: compressed-tensors' ``pack_to_int32``.

    Each value is offset by ``2^(bits-1)`` and packed LSB first, ``32 / bits`` per word; a partial
    last word is padded with zero bits.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits={bits}; compressed-tensors containers here are 4 or 8 bits")
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
        raise ValueError(f"codes must lie in [{lo}, {hi}]; got [{int(codes.min())}, {int(codes.max())}]")
    u = codes.to(torch.int64) + (1 << (bits - 1))
    per = 32 // bits
    pad = -u.shape[dim] % per
    if pad:
        u = torch.nn.functional.pad(u, (0, pad) if dim == 1 else (0, 0, 0, pad))
    return pack_bits(u, bits, dim=dim, container=torch.int32).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, size: int, dim: int = 1) -> torch.Tensor:
    """Inverse of `pack_int32`: the first ``size`` signed codes along ``dim``, as int8."""
    u = unpack_bits(packed, bits, dim=dim, signed=False).to(torch.int16)
    return (u.narrow(dim, 0, size) - (1 << (bits - 1))).to(torch.int8)


def _scheme(label: str, m) -> str:
    """The scheme of ``m`` in compressed-tensors terms; raises `LoweringError` for what cannot be written."""
    q = m.qweight
    if m.online_hadamard:
        raise LoweringError(f"{label}: an online Hadamard rotation cannot be written to compressed-tensors here "
                            "(its transform_config is not produced by qnpu); use hadamard_rotation(online=False)")
    if q is None:
        raise LoweringError(f"{label}: has no integer weight codes (qweight is None: its recipe left the weight "
                            "float, or it is BiLLM / SliM-LLM)")
    ws = q.spec
    if not isinstance(q, QTensor) or ws.format == "binary":
        raise LoweringError(f"{label}: {_packed_kind(q)} weights have no compressed-tensors integer scheme; "
                            "export a W8/W4 recipe instead")
    if ws.granularity == "group" and ws.axis not in (-1, 1):
        raise LoweringError(f"{label}: weight groups run along axis {ws.axis}; compressed-tensors groups run along "
                            "the input dimension (axis=-1)")
    act = m.act_spec
    if act is not None and not act.dynamic:
        raise LoweringError(f"{label}: static activation scales (W8A8 static) are not written to compressed-tensors "
                            "by this exporter; use per-token dynamic activations (w8a8-dynamic) or export ascend-v1")
    scheme = classify(label, m)
    if scheme == "W4A8_DYNAMIC":
        raise LoweringError(f"{label}: W4A8 (4-bit weights with int8 activations) is not written to compressed-tensors "
                            "by this exporter; export W8A8_DYNAMIC, W4A16 or ascend-v1")
    if act is not None and act.granularity != "token":
        raise LoweringError(f"{label}: dynamic activations must be per token (int8 per-token dynamic); "
                            f"got {act.granularity}")
    return scheme


def _args(num_bits: int, *, symmetric: bool, strategy: str, group_size: int | None = None,
          dynamic: bool = False) -> dict:
    """One QuantizationArgs as compressed-tensors 0.20.0 serializes it (unset optional fields omitted)."""
    return {"num_bits": num_bits, "type": "int", "symmetric": symmetric, "group_size": group_size,
            "strategy": strategy, "dynamic": dynamic}


def layer_state(label: str, m, scheme: str, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, group)`` of quantized linear ``m``: its compressed tensors (no bias) and scheme dict."""
    q = m.qweight
    if q.zero_point is not None and q.spec.zero_point_domain == "float":
        raise ValueError(f"{label}: compressed-tensors stores integer zero points; this layer's are floating "
                         "(zero_point_domain='float'): export it as ascend-v1, or quantize with integer zero points")
    scale, zp, group = _weight_rows(q)
    codes = q.codes.to(torch.int32)
    out, k = codes.shape
    if q.spec.symmetric:            # the fixed zero (2^(b-1) for uint) leaves the codes
        codes = codes - (0 if zp is None else zp.repeat_interleave(k // zp.shape[1], dim=1).to(torch.int32))
        zp = None
    scale = scale.detach().to(torch.float32).to(dtype).contiguous()
    strategy = "group" if group else "channel"
    if scheme == "W8A8_DYNAMIC":
        tensors = {"weight": codes.to(torch.int8), "weight_scale": scale}
        scheme_dict = {"weights": _args(8, symmetric=True, strategy="channel"),
                       "input_activations": _args(8, symmetric=True, strategy="token", dynamic=True)}
    else:
        bits = 8 if q.spec.bits > 4 else 4
        if zp is not None and q.spec.format == "uint":  # unsigned codes move into the signed container
            codes, zp = codes - (1 << (bits - 1)), zp.to(torch.int32) - (1 << (bits - 1))
        tensors = {"weight_packed": pack_int32(codes, bits, dim=1), "weight_scale": scale,
                   "weight_shape": torch.tensor([out, k], dtype=torch.int64)}
        if zp is not None:
            tensors["weight_zero_point"] = pack_int32(zp.to(torch.int32), bits, dim=0)
        scheme_dict = {"weights": _args(bits, symmetric=zp is None, strategy=strategy, group_size=group or None),
                       "input_activations": None}
    scheme_dict.update(output_activations=None, format=SCHEME_FORMATS[scheme])
    return tensors, scheme_dict


def compressed_tensors_state(model) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, quantization_config)`` of ``model``; raises `LoweringError` before building any tensor."""
    layers = quantized_layers(model)
    schemes = {label: _scheme(label, m) for label, m in layers.items()}
    dtype = next(iter(layers.values())).weight.dtype
    tensors, groups = {}, []          # groups: [scheme dict, [labels]] in first-seen order
    for label, m in layers.items():
        layer, scheme_dict = layer_state(label, m, schemes[label], dtype)
        tensors.update({f"{label}.{name}": t.contiguous() for name, t in layer.items()})
        same = next((g for g in groups if g[0] == scheme_dict), None)
        if same is None:
            groups.append([scheme_dict, [label]])
        else:
            same[1].append(label)
    tensors.update(float_tensors(model, layers, dtype))
    ignore = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in layers]
    formats = {g[0]["format"] for g in groups}
    config_groups = {f"group_{i}": {"targets": ["Linear"] if len(groups) == 1 else labels, **scheme_dict}
                     for i, (scheme_dict, labels) in enumerate(groups)}
    config = {"config_groups": config_groups, "format": formats.pop() if len(formats) == 1 else "mixed-precision",
              "global_compression_ratio": None, "ignore": ignore, "kv_cache_scheme": None,
              "moe_sparsity_config": None, "quant_method": "compressed-tensors", "quantization_status": "compressed",
              "sparsity_config": {}, "transform_config": {}, "version": CT_VERSION}
    return tensors, config


def write_compressed_tensors(model, folder: Path, tokenizer=None, state=None) -> None:
    """Write ``model`` into the (empty) ``folder`` (``state``: `compressed_tensors_state` if already built)."""
    tensors, quantization_config = state or compressed_tensors_state(model)
    folder = Path(folder)
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    config = model.config.to_dict()
    dtype = str(next(m.weight.dtype for m in model.modules() if is_quantized_linear(m))).removeprefix("torch.")
    config.update(dtype=dtype, torch_dtype=dtype, quantization_config=quantization_config)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
