"""Combinators: compose transforms and route them to layers by label.

``chain(a, b, c)`` runs ``a`` then ``b`` then ``c`` on the same block; ``masked(pattern, t)``
runs ``t`` only on the linears whose label matches; ``partition({pattern: t, ...}, default)``
gives each linear the first matching transform. Patterns are shell globs over labels
(``"*.mlp.down_proj"``) or, prefixed with ``"re:"``, regular expressions (``re.fullmatch``).
Each reads what its parts read (the union of their `reads_of`).
"""
from __future__ import annotations

import fnmatch
import re
from typing import NamedTuple

from qnpu.qcore import QSpec

from .base import EmptyState, QTransform, register_state, register_transform, union_reads
from .checks import refuse
from .view import BlockView, LinearSpec, fail

KEEP = "keep"


@register_state
class ChainState(NamedTuple):
    states: tuple


def _matches(pattern: str, label: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], label) is not None
    return fnmatch.fnmatchcase(label, pattern)


def _check_pattern(method: str, pattern: str) -> None:
    if not isinstance(pattern, str) or not pattern:
        refuse(method, "pattern", pattern, "a non-empty glob or 're:<regex>' string")
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as err:
            refuse(method, "pattern", pattern, f"a valid regular expression after 're:' (here: {err})")


@register_transform("chain", reads=lambda transforms: union_reads(transforms))
def chain(*transforms: QTransform) -> QTransform:
    """Apply ``transforms`` in order; the state is a `ChainState` of their states."""
    for i, t in enumerate(transforms):
        if not isinstance(t, QTransform):
            raise TypeError(f"chain: argument {i} is {type(t).__name__}, not a QTransform")

    def init(view: BlockView) -> ChainState:
        return ChainState(tuple(t.init(view) for t in transforms))

    def update(view: BlockView, state: ChainState):
        new_states = []
        for t, s in zip(transforms, state.states):
            view, s = t.update(view, s)
            new_states.append(s)
        return view, ChainState(tuple(new_states))

    return QTransform(init, update)


def _narrow(view: BlockView, keep) -> BlockView:
    return view._replace(targets=tuple(n for n in view.targets if keep(n)))


@register_transform("masked", reads=lambda pattern, inner: union_reads([inner]))
def masked(pattern: str, inner: QTransform) -> QTransform:
    """Run ``inner`` on the targets whose label matches ``pattern``; others are left alone."""
    _check_pattern("masked", pattern)

    def init(view: BlockView):
        return inner.init(_narrow(view, lambda n: _matches(pattern, view.label(n))))

    def update(view: BlockView, state):
        sub = _narrow(view, lambda n: _matches(pattern, view.label(n)))
        if not sub.targets:
            return view, state
        sub, state = inner.update(sub, state)
        return sub._replace(targets=view.targets), state

    return QTransform(init, update)


@register_state
class PartitionState(NamedTuple):
    states: tuple


@register_transform("partition", reads=lambda rules, default: union_reads([*rules.values(), default]))
def partition(rules: dict, default: QTransform | None = None) -> QTransform:
    """Route each target to the transform of the first pattern in ``rules`` its label matches
    (insertion order), else to ``default`` (None: leave it alone)."""
    for pattern in rules:
        _check_pattern("partition", pattern)
    routes = list(rules.items()) + ([("re:.*", default)] if default is not None else [])

    def owner(view: BlockView, name: str) -> int:
        label = view.label(name)
        return next((i for i, (p, _) in enumerate(routes) if _matches(p, label)), -1)

    def init(view: BlockView) -> PartitionState:
        return PartitionState(tuple(t.init(_narrow(view, lambda n, i=i: owner(view, n) == i))
                                    for i, (_, t) in enumerate(routes)))

    def update(view: BlockView, state: PartitionState):
        new_states = []
        for i, ((_, t), s) in enumerate(zip(routes, state.states)):
            sub = _narrow(view, lambda n: owner(view, n) == i)
            if sub.targets:
                sub, s = t.update(sub, s)
                view = sub._replace(targets=view.targets)
            new_states.append(s)
        return view, PartitionState(tuple(new_states))

    return QTransform(init, update)


def _spec_reads(activation) -> frozenset:
    """A static activation spec reads the activations: its input scales are fixed from calibration
    statistics (by ``activation_scales``, or by the engine when no step fixes them)."""
    static = isinstance(activation, QSpec) and not activation.dynamic
    return frozenset({"activations"}) if static else frozenset()


@register_transform("quant_specs", reads=lambda weight, activation: _spec_reads(activation))
def quant_specs(weight: QSpec | None | str = KEEP, activation: QSpec | None | str = KEEP) -> QTransform:
    """Set the weight and/or input-activation spec of every target (None: keep it in float;
    ``"keep"``: leave what an earlier step set). Weight specs use ``[out, in]`` layout: per-channel
    ``axis=0``, per-group ``axis=-1``."""
    for name, spec in (("weight", weight), ("activation", activation)):
        if not (spec is None or spec == KEEP or isinstance(spec, QSpec)):
            refuse("quant_specs", name, spec, "a QSpec, None or 'keep'")
    if isinstance(weight, QSpec):
        if weight.granularity == "group" and weight.axis not in (-1, 1):
            raise ValueError("quant_specs: a per-group weight spec must group along the input dim; "
                             "use axis=-1")
        if weight.granularity == "channel" and weight.axis not in (0, -2):
            raise ValueError("quant_specs: a per-channel weight spec must keep the output dim; use axis=0")
        if weight.granularity == "token" or weight.dynamic:
            raise ValueError("quant_specs: weights are quantized offline; use a static per-tensor, "
                             "per-channel or per-group weight spec")
    if isinstance(activation, QSpec) and activation.granularity not in ("tensor", "token"):
        raise ValueError(f"quant_specs: activation granularity {activation.granularity!r} is not "
                         "supported by the integer kernels; allowed: 'tensor' (static) | 'token' (dynamic)")

    def update(view: BlockView, state):
        updates = {}
        for name in view.targets:
            old = view.specs.get(name, LinearSpec())
            w = old.weight if weight == KEEP else weight
            a = old.activation if activation == KEEP else activation
            if w is not None and w.granularity == "group" and view.weight(name).shape[1] % w.group_size:
                fail("quant_specs", view, name,
                     f"group_size={w.group_size} does not divide in_features={view.weight(name).shape[1]}",
                     "pick a divisor of in_features, or route this layer to a per-channel spec with masked()")
            updates[name] = LinearSpec(w, a)
        return view.with_specs(updates), state

    return QTransform(lambda view: EmptyState(), update)
