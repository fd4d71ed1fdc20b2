"""Error metrics between a reference tensor and its quantized approximation (computed in float64)."""
from __future__ import annotations

import math

import torch


def _pair(x: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape != x_hat.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(x_hat.shape)}")
    return x.detach().double(), x_hat.detach().double()


def mse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Mean squared error ``mean((x - x_hat)^2)``."""
    a, b = _pair(x, x_hat)
    return float(((a - b) ** 2).mean())


def max_abs_error(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """``max |x - x_hat|``."""
    a, b = _pair(x, x_hat)
    return float((a - b).abs().max())


def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum x^2 / sum (x - x_hat)^2)`` in dB.

    ``inf`` when the approximation is exact; ``-inf`` when the signal is zero but the error is not.
    """
    a, b = _pair(x, x_hat)
    noise = float(((a - b) ** 2).sum())
    signal = float((a**2).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def relative_output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """``||X W^T - X W_hat^T||_F / ||X W^T||_F`` for activations ``x [..., in]`` and weights ``[out, in]``.

    The layer-output error that GPTQ (Frantar et al. 2022) minimizes. 0 when ``X W^T`` is zero
    and the error is zero; ``inf`` when only the reference output is zero.
    """
    if w.shape != w_hat.shape:
        raise ValueError(f"weight shapes differ: {tuple(w.shape)} vs {tuple(w_hat.shape)}")
    if x.shape[-1] != w.shape[-1]:
        raise ValueError(f"x has {x.shape[-1]} input features but w has {w.shape[-1]}")
    xd = x.detach().double().reshape(-1, x.shape[-1])
    ref = xd @ w.detach().double().T
    err = float(torch.linalg.norm(xd @ (w.detach().double() - w_hat.detach().double()).T))
    den = float(torch.linalg.norm(ref))
    if den == 0.0:
        return 0.0 if err == 0.0 else math.inf
    return err / den
