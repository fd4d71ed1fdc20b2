"""Static activation quantization parameters from calibration statistics.

Dynamic (per-token) activation specs need nothing offline: the runtime computes
``scale = amax(|x_t|) / 127`` per token (``npu_dynamic_quant``). Static per-tensor specs need one
``(scale, zero_point)`` per linear input, fixed at calibration time from the statistics of the
input *after* every earlier transform (smoothing and rotation change the activation range):

* symmetric:  ``scale = c * max_j absmax_j / L`` (``L`` = the spec's symmetric levels);
* asymmetric: ``scale = (hi - lo) / (qmax - qmin)``, ``zero_point = rint(qmin - lo / scale)`` with
  ``lo, hi`` the min / max of the calibration token sample (clipped by ``c``, and with 0 inside).

This is the static scheme of SmoothQuant's W8A8 (Xiao et al. 2023) and of Ascend's
``npu_quantize`` (``x_q = rint(x / input_scale + input_offset)``).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from qnpu.qcore import QSpec, choose_qparams

from .base import QTransform, register_state, register_transform
from .view import BlockView, fail


@register_state
class ActivationState(NamedTuple):
    """Static input ``(scale, zero_point)`` per linear name; zero_point None when symmetric."""

    qparams: dict


def static_input_qparams(view: BlockView, name: str, spec: QSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(scale, zero_point)`` of ``name``'s input under a static per-tensor ``spec``."""
    stats = view.stats.get(name)
    if spec.symmetric:
        if stats is None or stats.absmax is None:
            fail("activation_scales", view, name, "no activation absmax statistics",
                 "calibrate the block so LinearStats.absmax is set")
        sample = torch.stack([stats.absmax.max(), -stats.absmax.max()])
    else:
        if stats is None or stats.tokens is None:
            fail("activation_scales", view, name, "no calibration token sample for an asymmetric spec",
                 "calibrate the block so LinearStats.tokens is set, or use a symmetric activation spec")
        sample = torch.stack([stats.tokens.max(), stats.tokens.min()])
    return choose_qparams(sample.float(), spec.replace(granularity="tensor", axis=0, group_size=None))


@register_transform("activation_scales", reads={"activations"})
def activation_scales() -> QTransform:
    """Fix static activation scales for every target whose activation spec is static (not dynamic)."""

    def update(view: BlockView, state: ActivationState):
        found = {}
        for name in view.targets:
            spec = view.specs.get(name)
            if spec is None or spec.activation is None or spec.activation.dynamic:
                continue
            found[name] = static_input_qparams(view, name, spec.activation)
        return view, ActivationState({**state.qparams, **found})

    return QTransform(lambda view: ActivationState({}), update)
