"""Calibration statistics of linear inputs (the data GPTQ, AWQ and SmoothQuant consume)."""
from __future__ import annotations

from typing import Mapping

import torch

from .block import block_forward
from .view import BlockStructure, LinearStats


def linear_stats(x: torch.Tensor, *, fp_x: torch.Tensor | None = None, max_tokens: int = 512) -> LinearStats:
    """`LinearStats` of input rows ``x [..., in]``: ``H = X^T X / n`` (float32), per-channel absmax,
    the first ``max_tokens`` rows, and for GPTAQ the float-model rows ``fp_x`` and
    ``(X_fp - X)^T X / n``."""
    rows = x.detach().reshape(-1, x.shape[-1]).float()
    n = rows.shape[0]
    fp_rows = None if fp_x is None else fp_x.detach().reshape(-1, x.shape[-1]).float()
    return LinearStats(
        hessian=rows.T @ rows / n,
        absmax=rows.abs().amax(0),
        tokens=rows[:max_tokens].clone(),
        fp_tokens=None if fp_rows is None else fp_rows[:max_tokens].clone(),
        fp_cross=None if fp_rows is None else (fp_rows - rows).T @ rows / n,
    )


def block_stats(params: Mapping[str, torch.Tensor], structure: BlockStructure, x: torch.Tensor, *,
                fp_params: Mapping[str, torch.Tensor] | None = None, fp_x: torch.Tensor | None = None,
                online_hadamard: tuple[str, ...] = (), max_tokens: int = 512) -> dict[str, LinearStats]:
    """Stats of every linear's input when the block runs on ``x`` (inputs as fed to the weights,
    i.e. after any online Hadamard); with ``fp_params``/``fp_x`` also the float path's inputs for GPTAQ."""
    seen: dict = {}
    with torch.no_grad():
        block_forward(params, structure, x, capture=seen, online_hadamard=online_hadamard)
        fp_seen: dict | None = None
        if fp_params is not None or fp_x is not None:
            fp_seen = {}
            block_forward(fp_params or params, structure, x if fp_x is None else fp_x, capture=fp_seen,
                          online_hadamard=online_hadamard)
    return {name: linear_stats(seen[name], fp_x=None if fp_seen is None else fp_seen[name],
                               max_tokens=max_tokens) for name in structure.linears}


def scale_stats(st: LinearStats, s: torch.Tensor) -> LinearStats:
    """Statistics of the input ``X' = X diag(1/s)`` given those of ``X``: ``H' = diag(1/s) H diag(1/s)``,
    ``absmax' = absmax / s``, rows / s, ``fp_cross' = diag(1/s) fp_cross diag(1/s)``."""
    inv = 1.0 / s.double()

    def vec(t):
        return None if t is None else (t.double() * inv).to(t.dtype)

    def mat(t):
        return None if t is None else (inv[:, None] * t.double() * inv[None, :]).to(t.dtype)

    return LinearStats(hessian=mat(st.hessian), absmax=vec(st.absmax), tokens=vec(st.tokens),
                       fp_tokens=vec(st.fp_tokens), fp_cross=mat(st.fp_cross))
