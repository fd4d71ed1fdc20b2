"""Shared fixtures of the Hessian-based rounding tests (BiLLM, SliM-LLM)."""
import math

import torch


def problem(seed: int, out: int, n_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and the Hessian of correlated inputs with two outlier channels."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=g) / math.sqrt(n_in)
    x = torch.randn(4 * n_in, n_in, generator=g) @ mix
    x[:, torch.randperm(n_in, generator=g)[:2]] *= 20.0
    return torch.randn(out, n_in, generator=g) / math.sqrt(n_in), x.T @ x / x.shape[0]


def h_error(w, q, h) -> float:
    d = w.double() - q.double()
    return float(torch.einsum("oi,ij,oj->", d, h.double(), d))
