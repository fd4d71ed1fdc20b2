"""A functional Llama-style decoder block: the reference the transforms' invariants are stated on.

``y = h + down(silu(gate(n2(h))) * up(n2(h)))``, ``h = x + o(attn(rope(q(n1 x)), rope(k(n1 x)), v(n1 x)))``
with RMSNorm ``n(x) = x / sqrt(mean(x^2) + eps) * g`` (Zhang & Sennrich 2019), rotary position
embeddings in the rotate-half convention (Su et al. 2021), causal grouped-query attention
(Ainslie et al. 2023) and optional per-head q/k RMSNorms (Qwen3). It matches Hugging Face's
``LlamaDecoderLayer`` math so that searches can score a whole block without nn.Modules.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from qnpu.qcore import QSpec, fake_quantize, hadamard_transform

from .view import BlockStructure


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in float32 and returned in ``x``'s dtype."""
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        out = out * weight.float()
    return out.to(x.dtype)


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding of ``x [b, heads, t, d]`` at positions 0..t-1 (rotate-half pairing)."""
    d, t = x.shape[-1], x.shape[-2]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d)
    angles = torch.arange(t, dtype=torch.float32, device=x.device)[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    rotated = torch.cat([-x2, x1], -1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def _linear_of(params: Mapping[str, torch.Tensor], act_specs: Mapping[str, QSpec],
               online_hadamard: tuple[str, ...], capture: dict | None):
    def linear(name: str, inp: torch.Tensor) -> torch.Tensor:
        if name in online_hadamard:
            inp = hadamard_transform(inp)
        if capture is not None:
            capture[name] = inp
        if name in act_specs:
            inp = fake_quantize(inp, act_specs[name])
        return F.linear(inp, params[f"{name}.weight"], params.get(f"{name}.bias"))

    return linear


def _attention(linear, params: Mapping[str, torch.Tensor], s: BlockStructure, n1: torch.Tensor) -> torch.Tensor:
    b, t, _ = n1.shape
    hd, nh, nkv = s.head_dim, s.num_heads, s.num_kv_heads
    q = linear(s.q, n1).view(b, t, nh, hd).transpose(1, 2)
    k = linear(s.k, n1).view(b, t, nkv, hd).transpose(1, 2)
    v = linear(s.v, n1).view(b, t, nkv, hd).transpose(1, 2)
    if s.q_norm:
        q = rms_norm(q, params[f"{s.q_norm}.weight"], s.norm_eps)
        k = rms_norm(k, params[f"{s.k_norm}.weight"], s.norm_eps)
    q, k = rope(q, s.rope_theta), rope(k, s.rope_theta)
    group = nh // nkv
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return linear(s.o, attn.transpose(1, 2).reshape(b, t, nh * hd))


def _mlp(linear, s: BlockStructure, n2: torch.Tensor) -> torch.Tensor:
    return linear(s.down, F.silu(linear(s.gate, n2)) * linear(s.up, n2))


def attention_output(params: Mapping[str, torch.Tensor], s: BlockStructure, n1: torch.Tensor, *,
                     online_hadamard: tuple[str, ...] = ()) -> torch.Tensor:
    """The self-attention module on its normalized input ``n1 [b, t, hidden]`` (sequences, positions
    0..t-1): ``o(attn(rope(q n1), rope(k n1), v n1))``, o_proj's output before the residual add."""
    return _attention(_linear_of(params, {}, online_hadamard, None), params, s, n1)


def mlp_output(params: Mapping[str, torch.Tensor], s: BlockStructure, n2: torch.Tensor, *,
               online_hadamard: tuple[str, ...] = ()) -> torch.Tensor:
    """The MLP module on its normalized input ``n2 [..., hidden]`` (rows are independent):
    ``down(silu(gate n2) * up n2)``, before the residual add."""
    return _mlp(_linear_of(params, {}, online_hadamard, None), s, n2)


def block_forward(
    params: Mapping[str, torch.Tensor],
    s: BlockStructure,
    x: torch.Tensor,
    *,
    act_specs: Mapping[str, QSpec] | None = None,
    online_hadamard: tuple[str, ...] = (),
    capture: dict | None = None,
) -> torch.Tensor:
    """Run the block on ``x [b, t, hidden]``.

    act_specs:       fake-quantize the input of each named linear with its spec (dynamic
                     parameters from the data at hand) to simulate quantized activations.
    online_hadamard: linears whose input is multiplied by a normalized Hadamard matrix at run
                     time (QuaRot's online rotation, Ashkboos et al. 2024).
    capture:         if a dict, receives each linear's input as fed to its weight.
    """
    linear = _linear_of(params, act_specs or {}, online_hadamard, capture)
    h = x + _attention(linear, params, s, rms_norm(x, params.get(f"{s.attn_norm}.weight"), s.norm_eps))
    return h + _mlp(linear, s, rms_norm(h, params.get(f"{s.mlp_norm}.weight"), s.norm_eps))
