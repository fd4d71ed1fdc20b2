"""Hypothesis strategies for quantization property tests.

Tensors are drawn as (shape, distribution, seed, magnitude) and generated with an explicit
``torch.Generator``: reproducible, fast for large shapes, and free of global RNG state. The
distributions cover what breaks quantizers: Gaussian bulk, heavy tails, exact zeros, constant
rows, a lone spike, and (for activations) correlated channels with a few outlier channels
10-100x larger than the rest, as measured in LLM activations (Dettmers et al. 2022; Xiao et al. 2023).
"""
from __future__ import annotations

import math

from hypothesis import example
import hypothesis.strategies as st
import torch

from qnpu.qcore import QSpec

WEIGHT_KINDS = ("gaussian", "heavy_tailed", "uniform", "spike", "constant_rows", "sparse", "zeros")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sample(kind: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = _gen(seed)
    if kind == "gaussian":
        return torch.randn(shape, generator=g)
    if kind == "heavy_tailed":
        # Gaussian scale mixture with log-normal scales: kurtosis far above 3, like LLM weights.
        return torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g))
    if kind == "uniform":
        return torch.rand(shape, generator=g) * 2 - 1
    if kind == "spike":
        x = torch.randn(shape, generator=g) * 1e-2
        flat = x.view(-1)
        flat[int(torch.randint(flat.numel(), (1,), generator=g))] = 10.0
        return x
    if kind == "constant_rows":
        rows = torch.randn(shape[:-1] + (1,), generator=g) if len(shape) else torch.randn((), generator=g)
        return rows.expand(shape).clone()
    if kind == "sparse":
        x = torch.randn(shape, generator=g)
        return x * (torch.rand(shape, generator=g) < 0.1)
    if kind == "zeros":
        return torch.zeros(shape)
    raise ValueError(f"unknown kind {kind!r}; allowed: {WEIGHT_KINDS}")


def shapes(*, min_dims: int = 1, max_dims: int = 3, min_side: int = 1, max_side: int = 32):
    """Tensor shapes as tuples of ints."""
    return st.lists(st.integers(min_side, max_side), min_size=min_dims, max_size=max_dims).map(tuple)


@st.composite
def tensors(draw, shape=None, *, kinds=WEIGHT_KINDS, dtype: torch.dtype = torch.float32,
            magnitudes=(1e-3, 1e3)):
    """Float tensors of ``shape`` (a tuple or a strategy; default `shapes()`) drawn from ``kinds``."""
    if shape is None:
        shape = shapes()
    if not isinstance(shape, tuple):
        shape = draw(shape)
    kind = draw(st.sampled_from(kinds))
    seed = draw(st.integers(0, 2**32 - 1))
    lo, hi = magnitudes
    mag = 10 ** draw(st.floats(math.log10(lo), math.log10(hi)))
    return (_sample(kind, shape, seed) * mag).to(dtype)


def weights(rows=st.integers(1, 48), cols=st.integers(1, 96), **kwargs):
    """``[out, in]`` weight matrices (see `tensors` for the distributions)."""
    return st.tuples(rows, cols).flatmap(lambda rc: tensors(rc, **kwargs))


@st.composite
def activations(draw, tokens=st.integers(1, 64), channels=st.integers(2, 96), *,
                max_outlier_channels: int = 4, dtype: torch.dtype = torch.float32):
    """``[tokens, channels]`` activations: mixed (correlated) channels plus a few outlier channels.

    ``X = Z A`` with ``Z`` Gaussian and a random mixing ``A``, so the Hessian ``X^T X`` is not
    diagonal; then up to ``max_outlier_channels`` channels are scaled by 10-100x.
    """
    t, c = draw(tokens), draw(channels)
    seed = draw(st.integers(0, 2**32 - 1))
    rank = draw(st.integers(1, c))
    g = _gen(seed)
    x = torch.randn(t, rank, generator=g) @ torch.randn(rank, c, generator=g) / math.sqrt(rank)
    n_out = draw(st.integers(0, min(max_outlier_channels, c)))
    if n_out:
        idx = torch.randperm(c, generator=g)[:n_out]
        factors = 10 ** (1 + torch.rand(n_out, generator=g))
        x[:, idx] *= factors
    return x.to(dtype)


@st.composite
def qspecs(draw, *, bits=st.integers(1, 8), formats=("int", "uint"),
           granularities=("tensor", "channel", "group", "token"), group_sizes=(1, 2, 4, 8, 16, 32),
           symmetric=st.booleans(), clip_ratios=st.one_of(st.just(1.0), st.floats(0.5, 1.0)),
           full_range=st.booleans()):
    """Valid `QSpec` values. Pair with `quantization_cases` to get a tensor whose shape fits."""
    fmt = draw(st.sampled_from(formats))
    if fmt == "binary":
        gran = draw(st.sampled_from(granularities))
        return QSpec(bits=1, format="binary", granularity=gran, axis=-1 if gran == "group" else 0,
                     group_size=draw(st.sampled_from(group_sizes)) if gran == "group" else None,
                     dynamic=gran == "token")
    sym = draw(symmetric)
    b = draw(bits)
    if sym and b == 1:
        b = 2
    gran = draw(st.sampled_from(granularities))
    return QSpec(
        bits=b, format=fmt, symmetric=sym, granularity=gran,
        axis=-1 if gran == "group" else 0,
        group_size=draw(st.sampled_from(group_sizes)) if gran == "group" else None,
        dynamic=gran == "token",
        clip_ratio=draw(clip_ratios),
        full_range=sym and draw(full_range),
    )


# Specs where off-by-one grids show (half of the default draws, so that a 25-example profile meets
# them): int4 whose absmax lands on 7.5 (round-half-even gives 8, clamped to 7), clipped int4, uint4
# groups with zero points, symmetric uint3 (zero point 4), per-token int8, int2.
EDGE_SPECS = (
    QSpec(bits=4, full_range=True, granularity="group", group_size=8, axis=-1),
    QSpec(bits=4, clip_ratio=0.75),
    QSpec(bits=4, format="uint", symmetric=False, granularity="group", group_size=4, axis=-1),
    QSpec(bits=3, format="uint"),
    QSpec(bits=8, granularity="token", dynamic=True),
    QSpec(bits=2, symmetric=False, granularity="tensor"),
)


@st.composite
def quantization_cases(draw, specs=None, *, max_rows: int = 24, max_groups: int = 6, **tensor_kwargs):
    """``(x, spec)`` pairs where ``x`` is 2-d and its shape fits ``spec`` (group sizes divide the row).

    Without ``specs``, half of the specs come from ``EDGE_SPECS`` and half from `qspecs`."""
    spec = draw(specs if specs is not None else st.one_of(st.sampled_from(EDGE_SPECS), qspecs()))
    rows = draw(st.integers(1, max_rows))
    if spec.granularity == "group":
        cols = spec.group_size * draw(st.integers(1, max_groups))
    else:
        cols = draw(st.integers(1, 64))
    return draw(tensors((rows, cols), **tensor_kwargs)), spec


def edge_cases() -> list[tuple[torch.Tensor, QSpec]]:
    """Fixed ``(x, spec)`` cases on which off-by-one grids show, whatever a profile draws: full-range
    int4 groups of absmax 7.5 (scale exactly 1) whose absmax is positive (+7.5 rounds half-to-even to
    8, which must be clamped to 7) and negative (-7.5 gives -8), clipped int4, uint4 groups that are all positive / all negative / mixed, symmetric
    uint3 (zero point 4), per-token int8 with an outlier, asymmetric int2, and zeros."""
    ramp = torch.linspace(-1.0, 1.0, 16).reshape(2, 8)
    return [
        (torch.tensor([[7.5, -3.75, 2.0, -5.5, 0.5, 1.25, -2.5, 3.0, -7.5, 3.5, -2.25, 5.0, -0.5, -1.0, 2.5, -4.0]]),
         QSpec(bits=4, full_range=True, granularity="group", group_size=8, axis=-1)),
        (ramp, QSpec(bits=4, clip_ratio=0.75)),
        (torch.tensor([[-1.0, 0.0, 0.5, 2.0, 0.1, 0.2, 0.3, 0.4], [-3.0, -2.0, -1.0, -0.5, 0.0, 0.0, 0.0, 0.0]]),
         QSpec(bits=4, format="uint", symmetric=False, granularity="group", group_size=4, axis=-1)),
        (torch.tensor([[-1.0, 0.5, 0.25], [0.3, -0.2, 1.0]]), QSpec(bits=3, format="uint")),
        (torch.tensor([[0.1, -0.2, 30.0, 0.05], [-0.3, 0.2, -0.1, 0.0]]),
         QSpec(bits=8, granularity="token", dynamic=True)),
        (ramp * 3 + 1, QSpec(bits=2, symmetric=False, granularity="tensor")),
        (torch.zeros(2, 8), QSpec(bits=4)),
    ]


def with_edge_cases(test):
    """Add `edge_cases` as explicit examples of a ``@given(quantization_cases())`` test: every
    profile runs them (before its random draws), so a bug they expose never depends on the draw."""
    for case in edge_cases():
        test = example(case)(test)
    return test
