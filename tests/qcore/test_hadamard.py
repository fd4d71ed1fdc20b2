"""Tests for qnpu.qcore.hadamard (Sylvester x Paley Hadamard matrices, fast transforms)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qnpu.qcore.hadamard import (
    _core,
    _jacobsthal,
    _paley_core,
    hadamard,
    hadamard_factors,
    hadamard_transform,
    is_hadamard_order,
    random_hadamard,
    random_hadamard_transform,
    random_signs,
)


# --- an independent reference for which sizes exist ---------------------------------

def _ref_prime_power(q: int) -> bool:
    if q < 2:
        return False
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)  # smallest prime factor
    while q % p == 0:
        q //= p
    return q == 1


def _ref_is_core(m: int) -> bool:
    if m == 1:
        return True
    if m & (m - 1) == 0:  # powers of two belong to Sylvester
        return False
    if (m - 1) % 4 == 3 and _ref_prime_power(m - 1):
        return True
    return m % 2 == 0 and (m // 2 - 1) % 4 == 1 and _ref_prime_power(m // 2 - 1)


def _ref_min_core(n: int) -> int | None:
    cores = [n >> j for j in range((n & -n).bit_length()) if _ref_is_core(n >> j)]
    return min(cores) if cores else None


SUPPORTED_UP_TO_2048 = [n for n in range(1, 2049) if _ref_min_core(n) is not None]
LARGE = [12800, 14336]


def test_reference_enumeration_is_nontrivial():
    assert len(SUPPORTED_UP_TO_2048) > 300
    assert 92 not in SUPPORTED_UP_TO_2048 and 668 not in SUPPORTED_UP_TO_2048


def test_supported_set_and_smallest_core_match_reference():
    for n in range(1, 4097):
        m = _ref_min_core(n)
        assert is_hadamard_order(n) == (m is not None), n
        if m is not None:
            p2, got_m, how = hadamard_factors(n)
            assert (p2 * got_m, got_m) == (n, m), n
            assert p2 & (p2 - 1) == 0 and isinstance(how, str) and how


# --- exactness of the dense matrices and of the fast transform -------------------------

@pytest.mark.parametrize("n", SUPPORTED_UP_TO_2048)
def test_dense_is_hadamard_and_fast_matches_dense(n):
    h = hadamard(n)  # float32 sums of <= 2048 terms of +-1 are exact
    assert h.shape == (n, n) and h.dtype == torch.float32
    assert bool(((h == 1) | (h == -1)).all())
    assert torch.equal(h @ h.T, n * torch.eye(n))
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    h64 = h.double()
    torch.testing.assert_close(hadamard_transform(x, normalize=False), x @ h64.T)
    torch.testing.assert_close(hadamard_transform(x), x @ h64.T / math.sqrt(n))


@pytest.mark.parametrize("n", LARGE)
def test_large_orders_are_hadamard(n):
    p2, m, _ = hadamard_factors(n)
    h = hadamard(n)
    assert bool((h.abs() == 1).all())
    # The Kronecker structure plus exact checks of both factors proves H H^T = n I ...
    a, b = hadamard(p2), hadamard(m)
    assert torch.equal(h, torch.kron(a, b))
    assert torch.equal(a @ a.T, p2 * torch.eye(p2)) and torch.equal(b @ b.T, m * torch.eye(m))
    # ... and the product itself, block by block, computed with the O(n^2 log n) fast path
    # (every partial sum is an integer below 2^24, so float32 is exact).
    for start in range(0, n, 1024):
        rows = h[start : start + 1024]
        expect = torch.zeros(rows.shape[0], n)
        expect[:, start : start + rows.shape[0]] = n * torch.eye(rows.shape[0])
        assert torch.equal(hadamard_transform(rows, normalize=False), expect)
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    dense = torch.cat([x @ h[s : s + 2048].double().T for s in range(0, n, 2048)], dim=1)
    torch.testing.assert_close(hadamard_transform(x, normalize=False), dense)


# --- sizes, constructions and GF(p^e) ---------------------------------------------------

@pytest.mark.parametrize("n", [12, 20, 28, 36, 52, 100, 576, 1536, 12800, 14336])
def test_known_sizes_are_constructible(n):
    assert is_hadamard_order(n)


@pytest.mark.parametrize(
    "n, expected",
    [
        (12800, (128, 100, "sylvester(2^7) x paley2(q=7^2)")),
        (14336, (512, 28, "sylvester(2^9) x paley1(q=3^3)")),
        (576, (16, 36, "sylvester(2^4) x paley2(q=17)")),
        (1536, (128, 12, "sylvester(2^7) x paley1(q=11)")),
        (28, (1, 28, "paley1(q=3^3)")),
        (52, (1, 52, "paley2(q=5^2)")),
        (100, (1, 100, "paley2(q=7^2)")),
    ],
)
def test_decomposition(n, expected):
    assert hadamard_factors(n) == expected


@pytest.mark.parametrize("k", range(17))
def test_powers_of_two_are_pure_sylvester(k):
    assert hadamard_factors(2**k) == (2**k, 1, f"sylvester(2^{k})")


# Prime powers with e > 1 of both residues, plus a few primes for contrast.
FIELDS = [("paley2", 3, 2), ("paley2", 5, 2), ("paley2", 7, 2), ("paley1", 3, 3),
          ("paley2", 3, 4), ("paley1", 3, 5), ("paley2", 5, 3), ("paley1", 7, 3),
          ("paley2", 11, 2), ("paley2", 13, 2), ("paley1", 11, 1), ("paley2", 13, 1)]


@pytest.mark.parametrize("kind, p, e", FIELDS)
def test_jacobsthal_properties(kind, p, e):
    q = p**e
    jac = _jacobsthal(p, e).astype(np.int64)
    assert jac.shape == (q, q) and (np.diag(jac) == 0).all()
    assert (jac.sum(axis=1) == 0).all()  # as many squares as non-squares
    assert (jac @ jac.T == q * np.eye(q, dtype=np.int64) - 1).all()
    assert (jac.T == (1 if q % 4 == 1 else -1) * jac).all()


@pytest.mark.parametrize("kind, p, e", FIELDS)
def test_paley_cores_over_prime_power_fields(kind, p, e):
    core = _paley_core(kind, p, e).astype(np.int64)
    m = p**e + 1 if kind == "paley1" else 2 * (p**e + 1)
    assert core.shape == (m, m) and set(np.unique(core)) == {-1, 1}
    assert (core @ core.T == m * np.eye(m, dtype=np.int64)).all()


def test_cached_cores_cannot_be_corrupted():
    assert not _core(12).flags.writeable
    h = hadamard(12)
    h.zero_()
    assert bool((hadamard(12).abs() == 1).all())


# --- unsupported sizes ------------------------------------------------------------------

@pytest.mark.parametrize("n", [6, 10, 14, 18, 22, 26, 30, 7, 9, 25, 92, 668, 4094, 3 * 65537])
def test_unsupported_sizes_raise_with_nearest_supported(n):
    assert not is_hadamard_order(n)
    with pytest.raises(ValueError, match=rf"\bn={n}\b") as info:
        hadamard_factors(n)
    msg = str(info.value)
    assert "2^k" in msg and "q+1" in msg and "2(q+1)" in msg
    below = int(re.search(r"below=(\d+)", msg).group(1))
    above = int(re.search(r"above=(\d+)", msg).group(1))
    assert below < n < above and is_hadamard_order(below) and is_hadamard_order(above)
    if above - below < 10_000:
        assert not any(is_hadamard_order(k) for k in range(below + 1, above))
    for fn in (hadamard, lambda n: hadamard_transform(torch.zeros(2, n))):
        with pytest.raises(ValueError, match=rf"\bn={n}\b"):
            fn(n)


@pytest.mark.parametrize("n", [0, -4])
def test_nonpositive_sizes_raise(n):
    with pytest.raises(ValueError, match=r"above=1\b"):
        hadamard_factors(n)
    assert not is_hadamard_order(n)


def test_non_integer_size():
    assert not is_hadamard_order(12.0)
    with pytest.raises(TypeError):
        hadamard_factors(12.0)


# --- random Hadamard rotations ----------------------------------------------------------

@pytest.mark.parametrize("n", [1, 12, 20, 64, 100, 576])
def test_random_hadamard_is_orthogonal_and_matches_transform(n):
    q = random_hadamard(n, seed=3, dtype=torch.float64)
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64))
    x = torch.randn(4, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(random_hadamard_transform(x, seed=3), x @ q.T)


def test_random_signs_and_seeds():
    a = random_signs(1000, 5)
    assert set(a.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(a, random_signs(1000, 5)) and not torch.equal(a, random_signs(1000, 6))
    assert random_signs(10, 5, dtype=torch.float16).dtype == torch.float16
    assert torch.equal(random_hadamard(20, 9), random_hadamard(20, 9))
    assert not torch.equal(random_hadamard(20, 9), random_hadamard(20, 10))
    x = torch.randn(2, 20)
    assert torch.equal(random_hadamard_transform(x, 9), random_hadamard_transform(x, 9))


# --- transform API behaviour ------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 2, 12, 40, 64])
def test_transform_keeps_dtype_shape_and_input(dtype, n):
    x = torch.randn(2, 3, n).to(dtype)
    before = x.clone()
    for normalize in (True, False):
        y = hadamard_transform(x, normalize=normalize)
        assert y.dtype == dtype and y.shape == x.shape
        assert y.data_ptr() != x.data_ptr()
        assert torch.equal(x, before)
        ref = x.double() @ hadamard(n, dtype=torch.float64).T / (math.sqrt(n) if normalize else 1)
        tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2}.get(dtype, 1e-5)
        torch.testing.assert_close(y.double(), ref.to(dtype).double(), rtol=tol, atol=tol * 4)


def test_transform_of_non_contiguous_and_empty_inputs():
    base = torch.randn(24, 5, dtype=torch.float64)
    x = base.T  # (5, 24), not contiguous
    expect = x @ hadamard(24, dtype=torch.float64).T / math.sqrt(24)
    torch.testing.assert_close(hadamard_transform(x), expect)
    assert hadamard_transform(torch.zeros(0, 12)).shape == (0, 12)
    assert hadamard_transform(torch.ones(8)).shape == (8,)
    with pytest.raises(TypeError):
        hadamard_transform(torch.ones(2, 4, dtype=torch.int32))


SMALL_ORDERS = [n for n in SUPPORTED_UP_TO_2048 if n <= 300]


@given(
    n=st.sampled_from(SMALL_ORDERS),
    lead=st.lists(st.integers(0, 3), max_size=3),
    seed=st.integers(0, 2**31 - 1),
)
def test_normalized_transform_preserves_norms(n, lead, seed):
    x = torch.randn(*lead, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    before = x.clone()
    y = hadamard_transform(x)
    assert y.shape == x.shape and torch.equal(x, before)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    # H^T H = n I, so multiplying by H / sqrt(n) must give x back.
    torch.testing.assert_close(y @ hadamard(n, dtype=torch.float64) / math.sqrt(n), x)
    z = random_hadamard_transform(x, seed)
    torch.testing.assert_close(z.norm(dim=-1), x.norm(dim=-1))
