"""Round-to-nearest (RTN) and stochastic rounding of weights, plus helpers every weight rounder shares.

Every weight-rounding transform reads each target's weight spec from ``view.specs`` (set with
`quant_specs`), replaces ``"<name>.weight"`` by its dequantized value (same dtype and shape, so
the block still runs in float) and keeps the quantized weight in a `WeightsState`: a `QTensor`
(rtn, gptq, gptaq), `BiLLMTensor` (billm) or `MixedTensor` (slim_llm). The engine reads quantized
weights from there only.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from qnpu.qcore import QSpec, QTensor, check_finite, quantize

from .base import QTransform, generator, register_state, register_transform
from .view import BlockView, TransformError, fail


@register_state
class WeightsState(NamedTuple):
    """Quantized weights by linear name (labels relative to the block)."""

    qweights: dict


def checked_weight(view: BlockView, name: str, transform: str) -> torch.Tensor:
    """``name``'s weight, after a NaN/Inf check whose message names the layer."""
    w = view.weight(name)
    try:
        check_finite(w, "weight")
    except ValueError as err:
        fail(transform, view, name, str(err), "inspect the checkpoint; quantization needs finite weights")
    return w


def quantizable(view: BlockView, transform: str) -> list[tuple[str, QSpec]]:
    """``(name, weight spec)`` of the targets to quantize. Targets without a weight spec stay
    float; if no target has one the recipe is wrong, and a `TransformError` says how to fix it."""
    found = [(n, view.specs[n].weight) for n in view.targets
             if view.specs.get(n) is not None and view.specs[n].weight is not None]
    if not found and view.targets:
        fail(transform, view, view.targets[0], "no weight spec is set",
             f"put quant_specs(weight=QSpec(...)) before {transform}() in the chain")
    return found


def hessian_of(view: BlockView, name: str, transform: str) -> torch.Tensor:
    """``view.stats[name].hessian``, or a `TransformError` saying how to collect it."""
    stats = view.stats.get(name)
    if stats is None or stats.hessian is None:
        fail(transform, view, name, "no calibration Hessian (view.stats[name].hessian is missing)",
             "collect stats with block_stats()/linear_stats() before running it (quantize_model does unless "
             "hessian=False)")
    return stats.hessian


def dead_columns(hessian: torch.Tensor, method: str, label: str) -> torch.Tensor:
    """Mask of the input columns with ``H_jj == 0``: inputs that are zero on every calibration token
    ("dead"), whose weights the Hessian-based rounders set to zero. A RuntimeWarning names the layer,
    the count and the first columns; a `TransformError` when every column is dead (the layer saw no
    input at all, e.g. calibration sequences of pad tokens: every weight would be zeroed)."""
    dead = torch.diagonal(hessian) == 0
    n = int(dead.sum())
    if n == dead.numel():
        raise TransformError(f"{method}: layer {label}: all {n} input columns are zero on every calibration token, "
                             "so every weight would be set to 0. Fix: calibrate on real text (not padding) or "
                             "round this layer with rtn()")
    if n:
        first = dead.nonzero().flatten()[:8].tolist()
        shown = ", ".join(map(str, first)) + (", ..." if n > len(first) else "")
        warnings.warn(f"{method}: layer {label}: {n} of {dead.numel()} input columns are zero on every calibration "
                      f"token ({shown}); their weights are set to 0", RuntimeWarning, stacklevel=3)
    return dead


def store(view: BlockView, state: WeightsState, results: dict[str, QTensor]) -> tuple[BlockView, WeightsState]:
    """Write dequantized weights into the view and the QTensors into the state."""
    updates = {f"{n}.weight": q.dequantize(view.weight(n).dtype) for n, q in results.items()}
    return view.with_params(updates), WeightsState({**state.qweights, **results})


@register_transform("rtn", reads=())
def rtn(rounding: str = "nearest", seed: int = 0) -> QTransform:
    """Round each weight to its spec's grid: ``W_q = clamp(round(W / s) + z)``, ``s, z`` from a
    preceding scale search (``weight_qparams``) or else absmax / min-max per slice. ``rounding="stochastic"`` draws
    ``floor(v + u)`` with ``u`` from a generator seeded by ``(seed, label)``."""
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rtn: rounding={rounding!r}; allowed: 'nearest' | 'stochastic'")

    def update(view: BlockView, state: WeightsState):
        results = {}
        for name, spec in quantizable(view, "rtn"):
            w = checked_weight(view, name, "rtn")
            gen = generator(seed, view.label(name)) if rounding == "stochastic" else None
            scale, zero_point = view.specs[name].weight_qparams or (None, None)
            results[name] = quantize(w, spec, scale=scale, zero_point=zero_point, rounding=rounding, generator=gen)
        return store(view, state, results)

    return QTransform(lambda view: WeightsState({}), update)
