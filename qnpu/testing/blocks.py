"""Random decoder blocks with realistic calibration statistics, for testing transforms."""
from __future__ import annotations

import math

import hypothesis.strategies as st
import torch

from qnpu.transforms.stats import block_stats
from qnpu.transforms.view import BlockStructure, BlockView, make_view


def random_block(seed: int = 0, *, hidden: int = 64, intermediate: int = 96, num_heads: int = 4,
                 num_kv_heads: int = 2, head_dim: int = 16, bias: bool = False, qk_norm: bool = False,
                 batch: int = 2, seq: int = 16, outlier_channels: int = 2,
                 prefix: str = "model.layers.0.") -> BlockView:
    """A Llama-style block (GQA when ``num_kv_heads < num_heads``; q/k/v/o biases if ``bias``, as
    openPangu-Embedded; per-head q/k norms if ``qk_norm``, as Qwen3) with block inputs whose
    channels are correlated and have ``outlier_channels`` channels 20-50x larger, and the
    stats of every linear's input computed by running the block on them."""
    g = torch.Generator().manual_seed(seed)
    s = BlockStructure(hidden_size=hidden, intermediate_size=intermediate, num_heads=num_heads,
                       num_kv_heads=num_kv_heads, head_dim=head_dim,
                       q_norm="self_attn.q_norm" if qk_norm else None,
                       k_norm="self_attn.k_norm" if qk_norm else None)
    shapes = {s.q: (num_heads * head_dim, hidden), s.k: (num_kv_heads * head_dim, hidden),
              s.v: (num_kv_heads * head_dim, hidden), s.o: (hidden, num_heads * head_dim),
              s.gate: (intermediate, hidden), s.up: (intermediate, hidden), s.down: (hidden, intermediate)}
    params = {f"{n}.weight": torch.randn(shp, generator=g) / math.sqrt(shp[1]) for n, shp in shapes.items()}
    if bias:
        for n in (s.q, s.k, s.v, s.o):
            params[f"{n}.bias"] = 0.1 * torch.randn(shapes[n][0], generator=g)
    norms = [s.attn_norm, s.mlp_norm] + ([s.q_norm, s.k_norm] if qk_norm else [])
    for n in norms:
        size = head_dim if n in (s.q_norm, s.k_norm) else hidden
        params[f"{n}.weight"] = 1.0 + 0.3 * torch.randn(size, generator=g)
    mix = torch.randn(hidden, hidden, generator=g) / math.sqrt(hidden)
    x = torch.randn(batch, seq, hidden, generator=g) @ mix
    if outlier_channels:
        idx = torch.randperm(hidden, generator=g)[:outlier_channels]
        x[..., idx] *= 20 + 30 * torch.rand(outlier_channels, generator=g)
    return make_view(params, s, block_stats(params, s, x), prefix=prefix, inputs=x)


@st.composite
def block_views(draw, *, bias=st.booleans(), qk_norm=st.booleans()):
    """`random_block` views over seeds, head layouts (MHA and GQA), biases and q/k norms."""
    heads, kv = draw(st.sampled_from([(4, 4), (4, 2), (4, 1), (6, 2)]))
    return random_block(draw(st.integers(0, 2**31 - 1)), num_heads=heads, num_kv_heads=kv,
                        head_dim=draw(st.sampled_from([8, 16])), bias=draw(bias), qk_norm=draw(qk_norm))
