"""GPTAQ weight rounding (Li et al. 2025, "GPTAQ: Efficient Finetuning-Free Quantization for
Asymmetric Calibration"; first released as GPTQv2).

GPTQ fits each layer to its own, already-quantized, input ``X [n, in]``; GPTAQ fits it to the
float model's output instead ("asymmetric calibration"), so errors of earlier layers are
compensated rather than inherited:

    ``min_Q ||W X_fp^T - Q X^T||_F^2``  with  ``X_fp = X + dX``.

Per row ``w`` (rows are independent) the objective is ``(w - q)^T H (w - q) + 2 (w - q)^T dXXT^T w``
up to a constant, with ``H = X^T X / n`` and ``dXXT = dX^T X / n`` (``LinearStats.fp_cross``).
Quantizing columns in sweep order as GPTQ does, when column ``j`` is fixed and ``F`` are the
columns after it, its own share of the asymmetry, ``dX_j w_j``, can still be absorbed by the free
inputs: the least-squares solution of ``X_F d = dX_j w_j`` is
``d = w_j (H_FF)^{-1} X_F^T dX_j / n = w_j (dXXT_{j,F} (H_FF)^{-1})^T``. Adding it to GPTQ's
error-feedback step gives the GPTAQ update

    ``W[:, F] -= err_j U_{j,F}  -  w_j P_{j,F}``,   ``P_{j,F} = alpha * dXXT_{j,F} (H_FF)^{-1}``,

with ``U`` the upper Cholesky factor of ``H^{-1}`` (``err_j``, ``U`` as in `qnpu.transforms.gptq`)
and ``w_j`` column ``j``'s (error-updated) value when it is quantized. Because
``(H_FF)^{-1} = U_FF^T U_FF`` for every trailing set ``F``, all rows of ``P`` come from one product,
the paper's "Cholesky reformulation": ``P = alpha * triu(dXXT U^T, 1) U``. ``alpha`` (0.25 in the
authors' code) damps the correction, which is estimated from a finite calibration sample.

With ``fp_cross = None`` (no float path) or ``dXXT = 0`` the update is exactly GPTQ's. One
deliberate difference from the authors' code: its lazy batch update of the columns past a block
multiplies ``P`` by the block's quantized values ``Q`` while its in-block update uses the
pre-quantization values ``w``; here both use ``w`` so the blocked sweep equals the
column-by-column recursion above for every ``block_size``.
"""
from __future__ import annotations

import torch

from qnpu.qcore import QSpec, QTensor

from .base import QTransform, register_transform
from .checks import check_range
from .gptq import check_options, sweep
from .rounder import hessian_of, weights_rounder


def _check_alpha(alpha) -> None:
    check_range("gptaq", "alpha", alpha, 0, hint="(0.25 is the authors' default)")


def gptaq_quantize(w: torch.Tensor, hessian: torch.Tensor, fp_cross: torch.Tensor | None, spec: QSpec, *,
                   block_size: int = 128, damp: float = 0.01, act_order: bool = False,
                   static_groups: bool = True, alpha: float = 0.25, qparams: tuple | None = None,
                   label: str = "layer") -> tuple[QTensor, dict]:
    """GPTAQ-round ``w [out, in]`` given ``hessian = X^T X / n`` and ``fp_cross = (X_fp - X)^T X / n``
    (both [in, in]; ``fp_cross=None`` gives exactly `gptq_quantize`). Options, qparams, errors and
    ``info`` as in `gptq_quantize` (``info["obs_loss"]`` is then GPTQ's term only)."""
    _check_alpha(alpha)
    return sweep(w, hessian, spec, block_size=block_size, damp=damp, act_order=act_order,
                 static_groups=static_groups, qparams=qparams, label=label, fp_cross=fp_cross,
                 alpha=float(alpha), method="gptaq")


@register_transform("gptaq", reads={"hessian", "float_path"})
def gptaq(block_size: int = 128, damp: float = 0.01, act_order: bool = True, static_groups: bool = True,
          alpha: float = 0.25) -> QTransform:
    """GPTAQ (Li et al. 2025) on every target with a weight spec, from ``view.stats[name].hessian``
    and ``.fp_cross`` (None: plain GPTQ); see `gptaq_quantize`. State: `WeightsState`."""
    check_options("gptaq", block_size, damp, act_order, static_groups)
    _check_alpha(alpha)

    def round_weight(view, name, w, spec):
        return gptaq_quantize(w, hessian_of(view, name, "gptaq"), view.stats[name].fp_cross, spec,
                              block_size=block_size, damp=damp, act_order=act_order, static_groups=static_groups,
                              alpha=alpha, qparams=view.specs[name].weight_qparams, label=view.label(name))[0]

    return weights_rounder("gptaq", round_weight)
