"""Random linear layers with correlated, outlier-carrying inputs, for testing weight rounders."""
from __future__ import annotations

import math

import torch


def mixed_layer(seed: int, channels: int, tokens: int, outliers: int, out: int = 24,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W [out, channels], X [tokens, channels])``: ``W ~ N(0, 1/channels)``, ``X = Z A`` with a
    random mixing ``A`` (correlated channels, as LLM activations; with independent channels GPTQ has
    nothing to exploit) and ``outliers`` channels scaled 10-50x."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(channels, channels, generator=g) / math.sqrt(channels)
    x = torch.randn(tokens, channels, generator=g) @ mixing
    if outliers:
        idx = torch.randperm(channels, generator=g)[:outliers]
        x[:, idx] *= 10 + 40 * torch.rand(outliers, generator=g)
    w = torch.randn(out, channels, generator=g) / math.sqrt(channels)
    return w.to(dtype), x.to(dtype)
