"""Metrics of the code benchmarks: pass@k, distribution summaries and the repetition-loop detector.

pass@k is the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on
Code", section 2.1): with ``n`` samples of which ``c`` pass,

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i)

and the product form is what is computed (no huge binomials). It is 1 when ``n - c < k`` (every
``k``-subset holds a passing sample), and ``pass@1 = c / n``. A benchmark's pass@k is the mean over
its problems.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

# The repetition-loop detector's defaults (see `repetition_loop`).
LOOP_WINDOW = 96
LOOP_MIN_REPEATS = 3
LOOP_MAX_PERIOD = 32


def _check_int(name: str, value, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    return int(value)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate of one problem from ``n`` samples, ``c`` of them correct."""
    n, c, k = _check_int("n", n, 1), _check_int("c", c, 0), _check_int("k", k, 1)
    if c > n:
        raise ValueError(f"c (correct samples) must be <= n (samples), got c={c}, n={n}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least k={k} samples per problem, got n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def report_ks(n: int) -> list[int]:
    """The k of pass@k reported for ``n`` samples per problem: 1 and the usual 2, 5, 10, 20, 50, 100
    that do not exceed ``n``."""
    return [k for k in (1, 2, 5, 10, 20, 50, 100) if k <= n]


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> float | None:
    """Mean pass@k over problems given as ``(n, c)`` pairs (None for no problems)."""
    values = [pass_at_k(n, c, k) for n, c in counts]
    return float(np.mean(values)) if values else None


def distribution(values: Sequence[float], bins: int = 10) -> dict:
    """``{count, mean, median, p90, min, max, histogram: {edges, counts}}`` of ``values``.

    ``p90`` is the 90th percentile with linear interpolation between order statistics (numpy's
    default); the histogram has ``bins`` equal-width bins over ``[min, max]`` (numpy.histogram;
    the last bin is closed). An empty input gives ``count`` 0 and None elsewhere."""
    arr = np.asarray(list(values), dtype=float)
    if arr.size == 0:
        return {"count": 0, "mean": None, "median": None, "p90": None, "min": None, "max": None,
                "histogram": {"edges": [], "counts": []}}
    counts, edges = np.histogram(arr, bins=bins)
    return {"count": int(arr.size), "mean": float(arr.mean()), "median": float(np.median(arr)),
            "p90": float(np.percentile(arr, 90)), "min": float(arr.min()), "max": float(arr.max()),
            "histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}}


def repetition_loop(tokens: Sequence[int], max_new_tokens: int, *, window: int = LOOP_WINDOW,
                    min_repeats: int = LOOP_MIN_REPEATS, max_period: int = LOOP_MAX_PERIOD) -> int | None:
    """The period of the repetition loop a generation ended in, or None when it did not.

    ``tokens`` are the generated token ids after the prompt, without the end-of-sequence token
    (a generation that stopped on EOS is shorter than ``max_new_tokens``). Definition: a generation
    is a *repetition failure* iff

    1. it hit the token limit: ``len(tokens) >= max_new_tokens`` (it never stopped by itself), and
    2. its tail ``T``, the last ``L = min(window, len(tokens))`` tokens, is periodic with some
       period ``p``, ``1 <= p <= max_period``: ``T[i] == T[i + p]`` for every ``0 <= i < L - p``,
       with at least ``min_repeats`` full periods in it (``L >= min_repeats * p``).

    The smallest such ``p`` is returned. Defaults: ``window`` 96, ``min_repeats`` 3,
    ``max_period`` 32 (a loop over one line of code, up to 32 tokens long, repeated 3 times to the
    limit). With a small ``max_new_tokens`` the window shrinks to the whole generation, so short
    periods are still found.
    """
    max_new_tokens = _check_int("max_new_tokens", max_new_tokens, 1)
    window = _check_int("window", window, 1)
    min_repeats = _check_int("min_repeats", min_repeats, 2)
    max_period = _check_int("max_period", max_period, 1)
    seq = list(tokens)
    if len(seq) < max_new_tokens:
        return None
    tail = seq[-min(window, len(seq)):]
    length = len(tail)
    for p in range(1, min(max_period, length // min_repeats) + 1):
        if all(tail[i] == tail[i + p] for i in range(length - p)):
            return p
    return None
