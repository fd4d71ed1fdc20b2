"""`QTransform` and the machinery that makes transforms composable and serializable.

A transform is a pair of pure functions (after optax's ``GradientTransformation``)::

    state = t.init(view)                 # state: a NamedTuple (a pytree), may be empty
    view, state = t.update(view, state)  # new view (params, stats, specs) and filled state

``config`` is the plain-dict description ``{"transform": name, **arguments}`` that
`recipe_from_dict` turns back into the same transform. Factories declared with
`register_transform` get it for free.

``reads`` declares which calibration data the transform's output depends on, as a frozenset of
`READS`: ``"hessian"`` (``LinearStats.hessian``), ``"activations"`` (``LinearStats.absmax`` /
``tokens``), ``"float_path"`` (``LinearStats.fp_tokens`` / ``fp_cross``) and ``"block_inputs"``
(``BlockView.inputs``). Params, structure and specs are always there. A transform may *transform*
statistics it does not read (a rotation rotates them); its params, specs and state must not depend
on them. ``register_transform(name, reads=...)`` declares it (a set, or a function of the factory's
arguments); `chain`, `masked` and `partition` take the union of their parts. A transform that
declares nothing (``reads=None``) is taken to read `UNDECLARED_READS` (`reads_of`). The
calibration engine collects only what the recipe reads, and runs no calibration at all for a
recipe that reads nothing.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
from typing import Any, Callable, NamedTuple

import torch

from qnpu.qcore import QSpec, QTensor, is_packed, packed_from_tensors

from .view import BlockView


# the calibration data a transform can read besides the block's params, structure and specs
READS = frozenset({"hessian", "activations", "float_path", "block_inputs"})
# what a transform without a declaration is taken to read: every statistic, and the block inputs
# (the float path, another forward pass per block, only for transforms that declare it)
UNDECLARED_READS = frozenset({"hessian", "activations", "block_inputs"})


class QTransform(NamedTuple):
    init: Callable[[BlockView], Any]
    update: Callable[[BlockView, Any], tuple[BlockView, Any]]
    config: dict | None = None
    reads: frozenset | None = None


def _checked_reads(reads, where: str) -> frozenset:
    found = frozenset(reads)
    unknown = sorted(map(str, found - READS))
    if unknown:
        raise ValueError(f"{where}: reads {unknown} are unknown; allowed: {', '.join(sorted(READS))}")
    return found


def reads_of(t: QTransform) -> frozenset:
    """What ``t`` reads of the calibration data (module docstring): its declaration, or
    `UNDECLARED_READS` when it has none."""
    if not isinstance(t, QTransform):
        raise TypeError(f"expected a QTransform; got {type(t).__name__}")
    return UNDECLARED_READS if t.reads is None else t.reads


def union_reads(transforms) -> frozenset:
    """The union of `reads_of` over ``transforms`` (None entries skipped): what a combinator reads."""
    return frozenset().union(*(reads_of(t) for t in transforms if t is not None))


class EmptyState(NamedTuple):
    """State of transforms that keep nothing."""


_FACTORIES: dict[str, Callable[..., QTransform]] = {}
_READ_DECLARATIONS: dict[str, Any] = {}
_STATE_TYPES: dict[str, type] = {"EmptyState": EmptyState}


def register_state(cls: type) -> type:
    """Class decorator: make a state NamedTuple known to `state_from_dict`."""
    _STATE_TYPES[cls.__name__] = cls
    return cls


def register_transform(name: str, *, reads=None):
    """Decorator for a transform factory: records its bound arguments as the transform's config and
    sets its ``reads`` (module docstring): an iterable of `READS`, or a function called with the
    factory's arguments by name (after defaults) that returns one. ``reads=None``: undeclared
    (`reads_of` then assumes `UNDECLARED_READS`)."""
    if reads is not None and not callable(reads):
        reads = _checked_reads(reads, f"transform {name!r}")

    def wrap(factory: Callable[..., QTransform]) -> Callable[..., QTransform]:
        sig = inspect.signature(factory)
        varargs = next((p.name for p in sig.parameters.values() if p.kind is p.VAR_POSITIONAL), None)

        @functools.wraps(factory)
        def build(*args, **kwargs) -> QTransform:
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            t = factory(*bound.args, **bound.kwargs)
            arguments = dict(bound.arguments)
            declared = _checked_reads(reads(**arguments), f"transform {name!r}") if callable(reads) else reads
            if varargs:
                arguments[varargs] = list(arguments[varargs])
            return t._replace(config={"transform": name, **_encode(arguments)}, reads=declared)

        def from_config(kwargs: dict) -> QTransform:
            args = kwargs.pop(varargs, []) if varargs else []
            return build(*args, **kwargs)

        if name in _FACTORIES:
            raise ValueError(f"transform name {name!r} is registered twice")
        _FACTORIES[name] = from_config
        _READ_DECLARATIONS[name] = reads
        return build

    return wrap


def registered_transforms() -> tuple[str, ...]:
    return tuple(sorted(_FACTORIES))


def declares_reads(name: str) -> bool:
    """Whether the registered transform ``name`` declared what it reads (``register_transform(reads=...)``)."""
    return _READ_DECLARATIONS[name] is not None


# -- plain-dict encoding of recipe arguments and states ------------------------------------------
def _encode(obj: Any) -> Any:
    if isinstance(obj, QTransform):
        if obj.config is None:
            raise ValueError("a transform built without register_transform cannot be serialized")
        return obj.config
    if isinstance(obj, QSpec):
        return {"__qspec__": obj.to_dict()}
    if isinstance(obj, QTensor):
        return {"__qtensor__": {"codes": obj.codes, "scale": obj.scale, "zero_point": obj.zero_point,
                                "spec": obj.spec.to_dict(), "dtype": str(obj.dtype).removeprefix("torch.")}}
    if is_packed(obj):
        return {"__packed__": {"layout": obj.layout, "meta": obj.layout_meta(), "tensors": obj.to_tensors(),
                               "spec": obj.spec.to_dict(), "dtype": str(obj.dtype).removeprefix("torch.")}}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return {"__state__": type(obj).__name__, **{f: _encode(getattr(obj, f)) for f in obj._fields}}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _encode(v) for k, v in obj.items()}
    if isinstance(obj, (torch.Tensor, str, int, float, bool)) or obj is None:
        return obj
    raise TypeError(f"cannot encode {type(obj).__name__} into a plain dict")


def _decode(obj: Any) -> Any:
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "transform" in obj and obj.get("transform") in _FACTORIES:
        return recipe_from_dict(obj)
    if "__qspec__" in obj:
        return QSpec.from_dict(obj["__qspec__"])
    if "__qtensor__" in obj:
        d = obj["__qtensor__"]
        return QTensor(d["codes"], d["scale"], d["zero_point"], QSpec.from_dict(d["spec"]), getattr(torch, d["dtype"]))
    if "__packed__" in obj:
        d = obj["__packed__"]
        return packed_from_tensors(d["layout"], d["tensors"], d["meta"], QSpec.from_dict(d["spec"]),
                                   getattr(torch, d["dtype"]))
    if "__tuple__" in obj:
        return tuple(_decode(v) for v in obj["__tuple__"])
    if "__state__" in obj:
        cls = _STATE_TYPES.get(obj["__state__"])
        if cls is None:
            raise ValueError(f"unknown state type {obj['__state__']!r}; known: {sorted(_STATE_TYPES)}")
        return cls(**{k: _decode(v) for k, v in obj.items() if k != "__state__"})
    return {k: _decode(v) for k, v in obj.items()}


def recipe_to_dict(t: QTransform) -> dict:
    """The plain-dict (JSON/YAML-ready) form of a recipe."""
    return _encode(t)


def recipe_from_dict(data: dict) -> QTransform:
    """Inverse of `recipe_to_dict`: rebuild the transform from its registered factory."""
    name = data.get("transform")
    if name not in _FACTORIES:
        raise ValueError(f"unknown transform {name!r}; known: {', '.join(registered_transforms())}")
    kwargs = {k: _decode(v) for k, v in data.items() if k != "transform"}
    try:
        return _FACTORIES[name](kwargs)
    except TypeError as err:
        raise ValueError(f"recipe entry {name!r} has bad arguments: {err}") from None


def state_to_dict(state: Any) -> Any:
    """A state pytree as nested plain dicts/lists of tensors, strings and numbers."""
    return _encode(state)


def state_from_dict(data: Any) -> Any:
    """Inverse of `state_to_dict`."""
    return _decode(data)


def find_states(state: Any, cls: type) -> list:
    """Every ``cls`` instance inside a (chain / partition / masked) state pytree, in order."""
    if isinstance(state, cls):
        return [state]
    if isinstance(state, (tuple, list)):
        return [found for item in state for found in find_states(item, cls)]
    if isinstance(state, dict):
        return [found for item in state.values() for found in find_states(item, cls)]
    return []


def derive_seed(seed: int, *labels: str) -> int:
    """A 63-bit seed from ``seed`` and labels (e.g. the block prefix): same inputs, same seed."""
    digest = hashlib.sha256(repr((int(seed),) + labels).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(seed: int, *labels: str) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded by `derive_seed`: draws from it are made on the CPU and moved to
    the tensors' device, so a seed gives the same result on every device."""
    return torch.Generator(device="cpu").manual_seed(derive_seed(seed, *labels))
