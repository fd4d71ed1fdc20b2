"""Round-to-nearest (RTN) and stochastic rounding of weights.

A rounder on the shared scaffold (`qnpu.transforms.rounder`): every target with a weight spec is
rounded to its spec's grid, its dequantized value replaces the weight and its `QTensor` goes to a
`WeightsState`.
"""
from __future__ import annotations

from qnpu.qcore import quantize

from .base import QTransform, generator, register_transform
from .checks import check_choice
from .rounder import weights_rounder


@register_transform("rtn", reads=())
def rtn(rounding: str = "nearest", seed: int = 0) -> QTransform:
    """Round each weight to its spec's grid: ``W_q = clamp(round(W / s) + z)``, ``s, z`` from a
    preceding scale search (``weight_qparams``) or else absmax / min-max per slice. ``rounding="stochastic"`` draws
    ``floor(v + u)`` with ``u`` from a generator seeded by ``(seed, label)``."""
    check_choice("rtn", "rounding", rounding, ("nearest", "stochastic"))

    def round_weight(view, name, w, spec):
        gen = generator(seed, view.label(name)) if rounding == "stochastic" else None
        scale, zero_point = view.specs[name].weight_qparams or (None, None)
        return quantize(w, spec, scale=scale, zero_point=zero_point, rounding=rounding, generator=gen)

    return weights_rounder("rtn", round_weight)
