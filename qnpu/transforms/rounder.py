"""The scaffold every weight rounder shares (as `scale_search` has one for scale searches).

A rounder reads each target's weight spec from ``view.specs`` (set with `quant_specs`), replaces
``"<name>.weight"`` by its dequantized value (same dtype and shape, so the block still runs in
float) and keeps the quantized weight in a `WeightsState`: a `QTensor` (rtn, gptq, gptaq),
`BiLLMTensor` (billm) or `MixedTensor` (slim_llm). The engine reads quantized weights from there
only (docs/architecture.md, "Quantized weights: one channel, three types").

`weights_rounder(method, round_weight)` is that whole transform for an algorithm that only needs
a function ``round_weight(view, name, w, spec) -> quantized weight``: it selects the targets
(`quantizable`), reads each weight after a NaN/Inf check (`checked_weight`) and writes back through
`store`. A rounder with a richer state (slim_llm) uses `round_each` and `store` itself.
The per-linear readers (`hessian_of`, `live_hessian`, `no_scale_search`) and `core_errors` give
every rounder the same layer-naming errors.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, NamedTuple

import torch

from qnpu.qcore import QSpec, check_finite

from .base import QTransform, register_state
from .view import BlockView, TransformError, fail

# ``round_weight(view, name, w, spec)``: the quantized weight of one target (anything with
# ``dequantize(dtype)``, or a record that `round_each`'s ``quantized`` maps to one)
RoundWeight = Callable[[BlockView, str, torch.Tensor, QSpec], Any]
# ``check(view, name, spec)``: refusals that come before the weight is read
Check = Callable[[BlockView, str, QSpec], None]


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


def live_hessian(view: BlockView, name: str, transform: str) -> torch.Tensor:
    """`hessian_of`, after `dead_columns` warned about dead inputs (or refused a layer without any
    live one): for cores that zero dead columns silently (billm, slim_llm)."""
    hessian = hessian_of(view, name, transform)
    dead_columns(hessian, transform, view.label(name))
    return hessian


def no_scale_search(view: BlockView, name: str, transform: str, why: str) -> None:
    """Refuse ``weight_qparams`` from a preceding scale search for a rounder that fits its own
    scales (``why`` says how)."""
    if view.specs[name].weight_qparams is not None:
        fail(transform, view, name, f"weight_qparams from a scale search are set, but {why}",
             f"drop the scale search before {transform}()")


@contextlib.contextmanager
def core_errors(view: BlockView, name: str, transform: str, fix: str):
    """Turn a core's ValueError (a bad Hessian, say) into a `TransformError` naming the layer."""
    try:
        yield
    except ValueError as err:
        fail(transform, view, name, str(err), fix)


def round_each(view: BlockView, transform: str, round_weight: RoundWeight, *,
               check: Check | None = None) -> dict:
    """``{name: round_weight(view, name, w, spec)}`` over `quantizable` targets, in target order:
    ``check`` first (spec and calibration refusals), then the weight (`checked_weight`)."""
    results = {}
    for name, spec in quantizable(view, transform):
        if check is not None:
            check(view, name, spec)
        results[name] = round_weight(view, name, checked_weight(view, name, transform), spec)
    return results


def store_weights(view: BlockView, quantized: dict) -> BlockView:
    """``view`` with each ``"<name>.weight"`` replaced by ``quantized[name]`` dequantized to the
    weight's own dtype."""
    return view.with_params({f"{n}.weight": q.dequantize(view.weight(n).dtype) for n, q in quantized.items()})


def store(view: BlockView, state: WeightsState, quantized: dict) -> tuple[BlockView, WeightsState]:
    """Write dequantized weights into the view and the quantized ones into the state."""
    return store_weights(view, quantized), WeightsState({**state.qweights, **quantized})


def weights_rounder(transform: str, round_weight: RoundWeight, *, check: Check | None = None) -> QTransform:
    """The rounder transform of ``round_weight`` (see `round_each`); state: `WeightsState`."""

    def update(view: BlockView, state: WeightsState):
        return store(view, state, round_each(view, transform, round_weight, check=check))

    return QTransform(lambda view: WeightsState({}), update)
