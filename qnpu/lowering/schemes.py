"""Which lowered scheme a quantized linear is, and how to build its lowered module.

A quantized linear is any module with the `QLinear` protocol of ``qnpu.models``: ``weight``
(float, ``[out, in]``), ``bias``, ``qweight`` (a `QTensor` of the weight codes), ``act_spec``
(``None``, per-token dynamic or static), ``act_qparams`` (static ``(scale, zero_point)``) and
``online_hadamard``. Lowering reads only these, so it depends on qcore alone.

Scale rounding follows the model dtype as vllm-ascend loads AscendV1 (docs/architecture.md,
"Lowering"): weight and input scales are rounded to the model dtype; the W8A8 static deq scale
``input_scale * weight_scale`` is fp32 for bf16 models and the int64 word (top 19 bits) otherwise;
W8A8-dynamic weight scales are passed as bf16 for bf16 models and as fp32 otherwise.
"""
from __future__ import annotations

import torch

from qnpu.qcore import QTensor, pack_int4

from .encodings import decode_deq_scale, encode_deq_scale
from .modules import W4A8Linear, W4A8MatmulLinear, W8A8DynamicLinear, W8A8StaticLinear, WeightOnlyLinear
from .ops_matmul import A8W4_GROUP
from .ops_w4a8 import GROUP_STEP

SCHEMES = ("W8A8", "W8A8_DYNAMIC", "W8A16", "W4A16", "W4A8_DYNAMIC")


class LoweringError(ValueError):
    """A model, layer or target that cannot be lowered; the message names the layer and what to change."""


def is_quantized_linear(module) -> bool:
    return all(hasattr(module, a) for a in ("qweight", "act_spec", "act_qparams", "online_hadamard", "weight"))


def quantized_layers(model) -> dict:
    """``{label: module}`` of the model's quantized linears; `LoweringError` when there is none."""
    layers = {n: m for n, m in model.named_modules() if is_quantized_linear(m)}
    if not layers:
        raise LoweringError("the model has no quantized linears (QLinear); quantize it first "
                            "(qnpu.models.quantize_model or load_quantized)")
    return layers


def float_tensors(model, layers, dtype) -> dict:
    """Every tensor of ``model`` an export writes as float: all but the quantized ``layers``' own weights
    (their biases stay), in ``dtype``; a tied lm_head is left out (loaders tie it from the config)."""
    owned = tuple(f"{label}." for label in layers)
    tied = getattr(model.config, "tie_word_embeddings", False)
    return {key: value.detach().to(dtype).contiguous() for key, value in model.state_dict().items()
            if not (key.startswith(owned) and not key.endswith(".bias") or tied and key == "lm_head.weight")}


def _weight_rows(q: QTensor) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Per-output-row scale / zero point laid out ``[out, groups]`` and the group size (0: per channel)."""
    out, k = q.codes.shape
    spec = q.spec
    if spec.granularity == "group":
        return q.scale, q.zero_point, spec.group_size
    scale = q.scale.reshape(-1, 1).expand(out, 1) if q.scale.numel() in (1, out) else None
    zp = None if q.zero_point is None else q.zero_point.reshape(-1, 1).expand(out, 1)
    return scale, zp, 0


def _packed_kind(q) -> str:
    """How an error names a weight with no integer grid (BiLLM's planes, SliM-LLM's mixed groups)."""
    layout = getattr(q, "layout", None)
    return {"billm": "BiLLM binarized", "mixed": "SliM-LLM mixed-precision (1-3 bit groups)"}.get(
        layout, "binary / mixed-precision (BiLLM, SliM-LLM)")


def classify(label: str, m) -> str:
    """The scheme of quantized linear ``m`` (``label`` names it in errors); raises `LoweringError`."""
    q, act = m.qweight, m.act_spec
    if q is None:
        raise LoweringError(f"{label}: has no integer weight codes (qweight is None: its recipe left the weight "
                            "float, or it is BiLLM / SliM-LLM, which have no Ascend integer kernel)")
    ws = q.spec
    if not isinstance(q, QTensor) or ws.format == "binary":
        raise LoweringError(f"{label}: {_packed_kind(q)} weights have no Ascend integer kernel; lower a W8/W4 "
                            "recipe instead")
    if ws.granularity not in ("channel", "group", "tensor") or (ws.granularity == "channel" and ws.axis % 2 != 0):
        raise LoweringError(f"{label}: weight granularity {ws.granularity} (axis {ws.axis}) is not per output "
                            "channel or per input group; the Ascend matmuls scale per output channel")
    if act is None:
        k = q.codes.shape[1]
        if ws.granularity == "group" and not (ws.group_size % 32 == 0 and 32 <= ws.group_size <= k - 1):
            raise LoweringError(f"{label}: weight-only groups of {ws.group_size} over in_features {k}: "
                                "npu_weight_quant_batchmatmul takes antiquant_group_size a multiple of 32 in "
                                f"[32, {k - 1}]; quantize with such a --group-size, or per channel")
        return "W8A16" if ws.bits > 4 else "W4A16"
    if act.format != "int" or act.bits != 8 or not act.symmetric and act.dynamic:
        raise LoweringError(f"{label}: activation spec a{act.bits} {act.format} "
                            f"{'symmetric' if act.symmetric else 'asymmetric'} {'dynamic' if act.dynamic else 'static'} "
                            "has no Ascend kernel; allowed: symmetric int8 per-token dynamic, or int8 static per tensor")
    if act.clip_ratio != 1.0 or act.full_range:
        raise LoweringError(f"{label}: clipped / full-range activation specs differ from npu_dynamic_quant's amax/127")
    if ws.format != "int" or not ws.symmetric or q.zero_point is not None:
        raise LoweringError(f"{label}: asymmetric weights with quantized activations have no Ascend kernel "
                            "(npu_quant_matmul has no weight offset); use symmetric weights")
    if not act.dynamic:
        if act.granularity != "tensor":
            raise LoweringError(f"{label}: static activations must be per tensor (npu_quantize with one scale); "
                                f"got {act.granularity}")
        if ws.bits > 4 and ws.bits <= 8 and ws.granularity != "group":
            return "W8A8"
        raise LoweringError(f"{label}: static activations lower only with per-channel int8 weights (W8A8); "
                            f"got w{ws.bits} {ws.granularity}")
    if ws.bits > 4:
        if ws.granularity == "group":
            raise LoweringError(f"{label}: W8A8 dynamic needs per-channel weight scales; got groups of {ws.group_size}")
        return "W8A8_DYNAMIC"
    if ws.granularity == "group" and ws.group_size != A8W4_GROUP:
        k, n = q.codes.shape[1], q.codes.shape[0]
        if ws.group_size % GROUP_STEP or k % ws.group_size or n % 8:
            raise LoweringError(f"{label}: W4A8 per-group scales need groups of {A8W4_GROUP} (torch_npu A8W4) or, "
                                f"for qnpu.w4a8_matmul, a multiple of {GROUP_STEP} dividing in_features ({k}) and "
                                f"out_features ({n}) a multiple of 8; got groups of {ws.group_size}")
    return "W4A8_DYNAMIC"


def _common(label, m, dtype):
    return dict(label=label, in_features=m.qweight.codes.shape[1], out_features=m.qweight.codes.shape[0],
                dtype=dtype, online_hadamard=bool(m.online_hadamard))


def _in_dtype(t: torch.Tensor, dtype) -> torch.Tensor:
    return t.detach().to(torch.float32).to(dtype)


def _float_bias(m, dtype, bias_dtype=torch.float32):
    return None if m.bias is None else _in_dtype(m.bias, dtype).to(bias_dtype)


def build_weight_only(label, m, dtype, scheme):
    q = m.qweight
    scale, zp, group = _weight_rows(q)
    wide = q.spec.bits > 4
    codes = q.codes.to(torch.int32)
    offset = None if zp is None else -zp.to(torch.float32)
    if q.spec.format == "uint":                 # unsigned codes move into the signed container
        shift = 128 if wide else 8
        codes = codes - shift
        offset = shift - (zp.to(torch.float32) if zp is not None else torch.zeros_like(scale))
    wt = codes.t().contiguous()                 # (K, N)
    weight = wt.to(torch.int8) if wide else pack_int4(wt, dim=-1)
    bias_dtype = torch.float16 if dtype == torch.float16 else torch.float32
    return WeightOnlyLinear(weight=weight, antiquant_scale=_in_dtype(scale.t().contiguous(), dtype),
                            antiquant_offset=None if offset is None else _in_dtype(offset.t().contiguous(), dtype),
                            bias=_float_bias(m, dtype, bias_dtype), group_size=group, scheme=scheme,
                            **_common(label, m, dtype))


def build_w8a8_static(label, m, dtype):
    q = m.qweight
    in_scale, in_zp = m.act_qparams
    in_scale = _in_dtype(in_scale.reshape(1), dtype)
    offset = torch.zeros(1) if in_zp is None else in_zp.reshape(1).to(torch.float32)
    w_scale = _in_dtype(_weight_rows(q)[0].reshape(-1), dtype).to(torch.float32)
    deq = in_scale.to(torch.float32) * w_scale  # msModelSlim: deq_scale = input_scale * weight_scale (fp32)
    wq = q.codes.to(torch.int8)
    bias = torch.zeros(wq.shape[0]) if m.bias is None else m.bias.detach().to(torch.float32)
    applied = deq if dtype == torch.bfloat16 else decode_deq_scale(encode_deq_scale(deq))[0]
    quant_bias = torch.round(bias / applied - wq.to(torch.float32).sum(1) * offset).to(torch.int32)
    deq_scale = deq if dtype == torch.bfloat16 else encode_deq_scale(deq)
    return W8A8StaticLinear(weight=wq.t().contiguous(), input_scale_recip=(1.0 / in_scale).to(dtype),
                            input_offset=offset.to(dtype), quant_bias=quant_bias, deq_scale=deq_scale,
                            **_common(label, m, dtype))


def build_w8a8_dynamic(label, m, dtype, scheme="W8A8_DYNAMIC"):
    q = m.qweight
    w_scale = _in_dtype(_weight_rows(q)[0].reshape(-1), dtype)
    if dtype != torch.bfloat16:
        w_scale = w_scale.to(torch.float32)
    return W8A8DynamicLinear(weight=q.codes.to(torch.int8).t().contiguous(), weight_scale=w_scale,
                             bias=_float_bias(m, dtype), scheme=scheme, **_common(label, m, dtype))


def build_w4a8_codes(label, codes, scale, bias, dtype, widened=None):
    """W4A8 from int4 ``codes [out, in]``, fp32 ``scale [out, 1 or in/256]`` and an optional float bias."""
    out, k = codes.shape
    if k % A8W4_GROUP:   # A8W4 needs whole 256-groups: widen the int4 codes to int8 instead (exact)
        w_scale = _in_dtype(scale.reshape(-1), dtype)
        return W8A8DynamicLinear(weight=codes.to(torch.int8).t().contiguous(), scheme="W4A8_DYNAMIC",
                                 weight_scale=w_scale if dtype == torch.bfloat16 else w_scale.to(torch.float32),
                                 bias=None if bias is None else _in_dtype(bias, dtype).to(torch.float32),
                                 label=label, in_features=k, out_features=out, dtype=dtype)
    s = _in_dtype(scale, dtype).to(torch.float32)
    s = s.expand(-1, k // A8W4_GROUP) if s.shape[1] == 1 else s           # [out, k / 256]
    word = encode_deq_scale(s.t().contiguous())                           # (k/256, n) int64
    applied = decode_deq_scale(word)[0]
    wt = codes.to(torch.int32).t().contiguous()                           # (K, N)
    colsum = wt.to(torch.float32).reshape(k // A8W4_GROUP, A8W4_GROUP, -1).sum(1)
    y_offset = 8.0 * (colsum * applied).sum(0)                            # 8 * sum_k W * s2
    return W4A8Linear(weight=pack_int4(wt, dim=-1), scale=word, y_offset=y_offset.to(torch.float32),
                      bias=None if bias is None else _in_dtype(bias, dtype).to(torch.float32),
                      label=label, in_features=k, out_features=out, dtype=dtype)


def build_w4a8_matmul(label, codes, scale, bias, dtype, group_size):
    """W4A8 on ``qnpu::w4a8_matmul`` from int4 ``codes [out, in]`` and ``scale [out, 1 or in/group]``."""
    out, k = codes.shape
    s = _in_dtype(scale, dtype).to(torch.float32)
    s = s[:, 0].contiguous() if group_size == 0 else s.t().contiguous()   # (n,) or (k / g, n)
    return W4A8MatmulLinear(weight=pack_int4(codes.to(torch.int32).t().contiguous(), dim=-1), scale=s,
                            bias=None if bias is None else _in_dtype(bias, dtype).to(torch.float32),
                            group_size=group_size, label=label, in_features=k, out_features=out, dtype=dtype)


def build_w4a8(label, m, dtype, kernel: bool = False):
    """torch_npu's A8W4 (channel, groups of 256) or widened int8; other groups, or any W4A8 layer when
    ``kernel`` (the CATLASS library serves ``w4a8_matmul``), on ``qnpu::w4a8_matmul``."""
    scale, _, group = _weight_rows(m.qweight)
    if kernel or group not in (0, A8W4_GROUP):
        lowered = build_w4a8_matmul(label, m.qweight.codes, scale.detach(), m.bias, dtype, group)
    else:
        lowered = build_w4a8_codes(label, m.qweight.codes, scale.detach(), m.bias, dtype)
    lowered.online_hadamard = bool(m.online_hadamard)
    return lowered


BUILDERS = {
    "W8A8": build_w8a8_static,
    "W8A8_DYNAMIC": build_w8a8_dynamic,
    "W8A16": lambda label, m, dtype: build_weight_only(label, m, dtype, "W8A16"),
    "W4A16": lambda label, m, dtype: build_weight_only(label, m, dtype, "W4A16"),
    "W4A8_DYNAMIC": build_w4a8,
}
