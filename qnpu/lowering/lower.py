"""`lower(model, target)`: replace every quantized linear by the lowered module of its scheme.

The registry maps ``(target, scheme)`` to a builder; a target is a name, a pre-flight check run
on every layer before anything is built, and a set of schemes. Adding a target (say ``cuda``)
is one `register_target` call at the end of this module, with its prepare / check functions and
builders (docs/architecture.md, "Adding a lowering target").
"""
from __future__ import annotations

import copy
from typing import Callable, NamedTuple

import torch
from torch import nn

from .schemes import BUILDERS, LoweringError, build_w4a8, classify, is_quantized_linear


class Target(NamedTuple):
    name: str
    prepare: Callable[[], None]                              # before any work: imports, kernel registration
    check: Callable[[str, nn.Module, str, torch.dtype], None]  # per layer: (label, module, scheme, dtype)


REGISTRY: dict[tuple[str, str], Callable] = {}
TARGETS: dict[str, Target] = {}


def register_target(target: Target, builders: dict[str, Callable]) -> None:
    TARGETS[target.name] = target
    for scheme, build in builders.items():
        REGISTRY[(target.name, scheme)] = build


def _no_prepare() -> None:
    return None


def _no_check(label, module, scheme, dtype) -> None:
    return None


def _ascend_prepare() -> None:
    from .ascend import enable
    enable()


def _ascend_check(label, module, scheme, dtype) -> None:
    from .ascend import check_layer
    check_layer(label, module, scheme, dtype)


def _ascend_w4a8(label, m, dtype):
    from .ascend.kernels import has_kernel
    return build_w4a8(label, m, dtype, kernel=has_kernel("w4a8_matmul"))


register_target(Target("reference", _no_prepare, _no_check), BUILDERS)
register_target(Target("ascend", _ascend_prepare, _ascend_check), {**BUILDERS, "W4A8_DYNAMIC": _ascend_w4a8})


def quantized_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if is_quantized_linear(m)]


def plan(model: nn.Module, target: str = "reference") -> dict[str, str]:
    """``{layer label: scheme}`` for every quantized linear; raises `LoweringError` on the first that
    cannot be lowered for ``target``. Runs no kernels and modifies nothing."""
    if target not in TARGETS:
        raise LoweringError(f"target={target!r} does not exist; allowed: {' | '.join(sorted(TARGETS))}")
    layers = quantized_linears(model)
    if not layers:
        raise LoweringError("the model has no quantized linears (QLinear); quantize it first "
                            "(qnpu.models.quantize_model or load_quantized)")
    out = {}
    for label, m in layers:
        scheme = classify(label, m)
        if (target, scheme) not in REGISTRY:
            raise LoweringError(f"{label}: scheme {scheme} has no lowering for target {target!r}")
        TARGETS[target].check(label, m, scheme, m.weight.dtype)
        out[label] = scheme
    return out


def lower(model: nn.Module, target: str = "reference") -> nn.Module:
    """A new model whose quantized linears run integer ops (``torch.ops.qnpu.*``); ``model`` is untouched.

    ``target="reference"`` runs qnpu's bit-faithful reference kernels on any device;
    ``target="ascend"`` also refuses what an Atlas A2 cannot run (online Hadamard, float32
    models) and installs torch_npu as the NPU kernels of the same ops. Each layer's scheme
    (W8A8, W8A8_DYNAMIC, W8A16, W4A16, W4A8_DYNAMIC) comes from its weight and activation specs;
    the model dtype at lowering time (``model.to(torch.bfloat16)`` first for bf16) sets the
    scale encodings. Every layer is checked before any is built.
    """
    schemes = plan(model, target)
    TARGETS[target].prepare()
    originals = dict(quantized_linears(model))
    new = copy.deepcopy(model)
    for label, scheme in schemes.items():
        m = originals[label]
        lowered = REGISTRY[(target, scheme)](label, m, m.weight.dtype).to(m.weight.device)
        parent, _, child = label.rpartition(".")
        setattr(new.get_submodule(parent) if parent else new, child, lowered)
    return new


def check_target(target: str) -> None:
    """Fail early (before loading or quantizing anything) on an unknown target or a missing backend."""
    if target not in TARGETS:
        raise LoweringError(f"target={target!r} does not exist; allowed: {' | '.join(sorted(TARGETS))}")
    TARGETS[target].prepare()


def scheme_counts(schemes: dict[str, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in schemes.values():
        out[s] = out.get(s, 0) + 1
    return out
