"""Where quantization parameters live: reductions and expansions per granularity.

Every granularity stores its scale / zero point in a *natural* shape:

=========  ==================================================  =======================
tensor     ``()``                                              ``[out, in]`` -> ``()``
channel    size of ``axis`` kept, 1 elsewhere                  ``[out, in]`` -> ``[out, 1]``
group      ``axis`` shrunk to ``size // group_size``           ``[out, in]`` -> ``[out, in/g]``
token      leading dims kept, last dim 1                       ``[t, h]`` -> ``[t, 1]``
=========  ==================================================  =======================

A per-group spec whose group is the whole ``axis`` therefore has exactly the per-channel shape.
"""
from __future__ import annotations

import torch

from .spec import QSpec


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def normalized_axis(spec: QSpec, ndim: int) -> int:
    """``spec.axis`` as a non-negative index into a tensor of ``ndim`` dims (ValueError if out of range)."""
    if spec.granularity == "token":
        if ndim < 1:
            raise ValueError("per-token quantization needs a tensor with >= 1 dims; got a scalar")
        return ndim - 1
    if spec.granularity == "tensor":
        return 0
    if not -ndim <= spec.axis < ndim:
        raise ValueError(f"axis={spec.axis} is out of range for a {ndim}-d tensor; allowed: {-ndim}..{ndim - 1}")
    return spec.axis % ndim


def check_layout(shape: torch.Size | tuple[int, ...], spec: QSpec) -> None:
    """Raise ValueError when ``spec`` cannot be laid over a tensor of ``shape``."""
    axis = normalized_axis(spec, len(shape))
    if spec.granularity == "group":
        size = shape[axis]
        if size % spec.group_size:
            raise ValueError(
                f"group_size={spec.group_size} does not divide axis {spec.axis} of length {size}; "
                f"allowed group sizes: {_divisors(size)}")


def qparams_shape(shape: torch.Size | tuple[int, ...], spec: QSpec) -> tuple[int, ...]:
    """Natural shape of the scale / zero point of a tensor of ``shape`` under ``spec``."""
    check_layout(shape, spec)
    shape = tuple(shape)
    g = spec.granularity
    if g == "tensor":
        return ()
    axis = normalized_axis(spec, len(shape))
    if g == "channel":
        return tuple(n if i == axis else 1 for i, n in enumerate(shape))
    if g == "group":
        return shape[:axis] + (shape[axis] // spec.group_size,) + shape[axis + 1:]
    return shape[:-1] + (1,)


def reduce(x: torch.Tensor, spec: QSpec, op: str) -> torch.Tensor:
    """Reduce ``x`` to its natural qparams shape with ``op`` in {"amax", "amin", "absmax", "absmean"}."""
    check_layout(x.shape, spec)
    src = x.abs() if op in ("absmax", "absmean") else x
    fn = torch.mean if op == "absmean" else (torch.amin if op == "amin" else torch.amax)
    g = spec.granularity
    if x.numel() == 0:
        raise ValueError("cannot quantize an empty tensor (x.numel() == 0)")
    if g == "tensor":
        return fn(src)
    axis = normalized_axis(spec, x.ndim)
    if g == "channel":
        dims = [d for d in range(x.ndim) if d != axis]
        return fn(src, dim=dims, keepdim=True) if dims else src.clone()
    if g == "group":
        grouped = src.unflatten(axis, (x.shape[axis] // spec.group_size, spec.group_size))
        return fn(grouped, dim=axis + 1)
    return fn(src, dim=-1, keepdim=True)


def expand(p: torch.Tensor, shape: torch.Size | tuple[int, ...], spec: QSpec) -> torch.Tensor:
    """Broadcast a natural-shaped parameter back over a tensor of ``shape``."""
    if spec.granularity == "group":
        axis = normalized_axis(spec, len(shape))
        p = p.repeat_interleave(spec.group_size, dim=axis)
    return p.expand(shape)
