"""Hadamard matrices of non-power-of-two order and fast Hadamard transforms.

A Hadamard matrix ``H`` of order ``n`` has entries +-1 and ``H @ H.T == n * I``,
so ``H / sqrt(n)`` is orthogonal.  Rotating weights and activations by such a
matrix spreads outliers evenly over a channel before quantization, as in QuaRot
(Ashkboos et al., 2024, "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs").

Supported orders are ``n = 2^k * m`` with ``H = kron(A, B)``:

* ``A`` is Sylvester's matrix of order ``2^k`` (J. J. Sylvester, 1867, "Thoughts
  on inverse orthogonal matrices ..."), ``A_{2t} = [[A_t, A_t], [A_t, -A_t]]``;
* ``B`` is a core of order ``m``: ``m = 1``; or ``m = q + 1`` for a prime power
  ``q = 3 (mod 4)`` (Paley construction I); or ``m = 2(q + 1)`` for a prime
  power ``q = 1 (mod 4)`` (Paley construction II) -- R. E. A. C. Paley, 1933,
  "On orthogonal matrices", J. Math. Phys. 12, 311-320.

Both Paley cores are built from the Jacobsthal matrix ``Q[a, b] = chi(a - b)``
of the quadratic character ``chi`` of GF(q) (``chi(0) = 0``, ``+1`` on nonzero
squares, ``-1`` otherwise).  With ``S = [[0, 1^T], [-1, Q]]`` (skew, for
``q = 3 mod 4``) the core is ``I + S``; with ``S = [[0, 1^T], [1, Q]]``
(symmetric, for ``q = 1 mod 4``) it is
``kron(S, [[1, 1], [1, -1]]) + kron(I, [[1, -1], [-1, -1]])``.

``hadamard_transform`` computes ``x @ H.T`` without materializing ``H``: one
``m x m`` matmul for the core and, for the Sylvester factor, the fast
Walsh-Hadamard transform (k butterfly stages, O(n log n); Yates 1937, Good 1958).
"""

from __future__ import annotations

import functools
import math
import operator

import numpy as np
import torch

__all__ = ["hadamard_factors", "is_hadamard_order", "hadamard", "hadamard_transform",
           "random_signs", "random_hadamard", "random_hadamard_transform"]

MAX_CORE = 65536
_ALLOWED = ("2^k * m with m in {1, q+1 for a prime power q = 3 (mod 4), "
            f"2(q+1) for a prime power q = 1 (mod 4)}} and m <= {MAX_CORE}")


@functools.lru_cache(maxsize=1)
def _core_table() -> dict[int, tuple[str, int, int, int]]:
    """Map every usable core order m to (kind, q, p, e) with q = p**e."""
    sieve = np.ones(MAX_CORE + 1, dtype=bool)
    sieve[:2] = False
    for i in range(2, math.isqrt(MAX_CORE) + 1):
        if sieve[i]:
            sieve[i * i :: i] = False
    table: dict[int, tuple[str, int, int, int]] = {1: ("sylvester", 1, 2, 0)}
    for p in map(int, np.flatnonzero(sieve)[1:]):  # q must be odd
        q, e = p, 1
        while q < MAX_CORE:
            # Paley I wins ties with Paley II: same cost, simpler core.
            if q % 4 == 3:
                table[q + 1] = ("paley1", q, p, e)
            elif 2 * (q + 1) <= MAX_CORE:
                table.setdefault(2 * (q + 1), ("paley2", q, p, e))
            q, e = q * p, e + 1
    # A power-of-two core is never needed: Sylvester covers it for free.
    return {m: v for m, v in table.items() if m == 1 or m & (m - 1)}


def _nearest(n: int) -> tuple[int | None, int]:
    below, above = None, None
    for m in _core_table():
        if m < n:
            c = m << ((n - 1) // m).bit_length() - 1
            below = c if below is None else max(below, c)
        c = m << max(0, -(-(n + 1) // m) - 1).bit_length()
        above = c if above is None else min(above, c)
    return below, above


def _factor(n: int) -> tuple[int, int, str] | None:
    table = _core_table()
    if n < 1:
        return None
    k = (n & -n).bit_length() - 1
    for j in range(k, -1, -1):  # increasing m: the cheapest transform first
        m = n >> j
        if m > MAX_CORE:
            return None
        if m in table:
            kind, q, p, e = table[m]
            how = f"sylvester(2^{j})"
            if m > 1:
                qs = f"{p}^{e}" if e > 1 else f"{q}"
                how = (f"{how} x " if j else "") + f"{kind}(q={qs})"
            return 1 << j, m, how
    return None


def hadamard_factors(n: int) -> tuple[int, int, str]:
    """Split ``n = p2 * m`` (p2 a power of two, m the smallest usable core).

    Returns ``(p2, m, how)``; raises ``ValueError`` if ``n`` is not of the form
    ``2^k * m`` described in the module docstring.
    """
    n = operator.index(n)
    found = _factor(n)
    if found is not None:
        return found
    below, above = _nearest(n)
    near = (f"below={below}, " if below is not None else "") + f"above={above}"
    raise ValueError(f"unsupported Hadamard size n={n}: n must be {_ALLOWED}; "
                     f"nearest supported sizes: {near}")


def is_hadamard_order(n) -> bool:
    """True iff ``hadamard_factors(n)`` succeeds (never raises)."""
    try:
        return _factor(operator.index(n)) is not None
    except TypeError:
        return False


def _irreducible(p: int, e: int) -> np.ndarray:
    """Monic irreducible polynomial of degree e over GF(p), lowest coefficient first."""

    def poly(code: int, deg: int) -> list[int]:
        return [(code // p**i) % p for i in range(deg)] + [1]

    def divides(g: list[int], f: list[int]) -> bool:  # long division by monic g
        r, d = list(f), len(g) - 1
        for top in range(len(r) - 1, d - 1, -1):
            window = r[top - d : top + 1]
            r[top - d : top + 1] = [(ri - r[top] * gi) % p for ri, gi in zip(window, g)]
        return not any(r[:d])

    # Reducible iff some monic factor of degree <= e/2 exists; e is small for q <= 65536.
    for code in range(1, p**e):
        f = poly(code, e)
        if not any(divides(poly(c, d), f) for d in range(1, e // 2 + 1) for c in range(p**d)):
            return np.array(f, dtype=np.int64)
    raise AssertionError(f"no irreducible polynomial of degree {e} over GF({p})")


def _jacobsthal(p: int, e: int) -> np.ndarray:
    """Q[a, b] = chi(a - b) over GF(p^e), elements coded as base-p digit integers."""
    q = p**e
    codes = np.arange(q, dtype=np.int64)
    weights = p ** np.arange(e, dtype=np.int64)
    digits = (codes[:, None] // weights) % p  # (q, e), lowest digit first
    if e == 1:
        squares = codes * codes % p
    else:
        f = _irreducible(p, e)
        prod = np.zeros((q, 2 * e - 1), dtype=np.int64)
        for i in range(e):
            prod[:, i : i + e] += digits[:, i : i + 1] * digits
        for k in range(2 * e - 2, e - 1, -1):  # x^e == -(f_0 + ... + f_{e-1} x^{e-1})
            prod[:, k - e : k] -= prod[:, k : k + 1] * f[:e]
        squares = (prod[:, :e] % p) @ weights
    chi = np.full(q, -1, dtype=np.int8)
    chi[squares] = 1
    chi[0] = 0
    if e == 1:
        # Circulant: row a is a window of chi(-k) read over two periods, which
        # avoids materializing a q x q index table.
        twice = np.tile(chi[(-codes) % p], 2)
        return np.lib.stride_tricks.sliding_window_view(twice, q)[q:0:-1].copy()
    # Subtraction acts digit-wise, so code(a - b) = code(high diff) * p + low diff.
    low = ((codes[:p, None] - codes[None, :p]) % p).astype(np.int16 if q < 2**15 else np.int32)
    diff = low
    for _ in range(e - 1):
        k = diff.shape[0] * p
        diff = (diff[:, None, :, None] * p + low[None, :, None, :]).reshape(k, k)
    return chi[diff]


@functools.lru_cache(maxsize=64)
def _paley_core(kind: str, p: int, e: int) -> np.ndarray:
    """Paley I/II core over GF(p^e) as a read-only int8 array (cached)."""
    q = p**e
    s = np.zeros((q + 1, q + 1), dtype=np.int8)
    s[0, 1:] = 1
    s[1:, 0] = -1 if kind == "paley1" else 1
    s[1:, 1:] = _jacobsthal(p, e)
    diag = np.arange(q + 1)
    if kind == "paley1":
        core = s
        core[diag, diag] = 1
    else:
        # kron(S, [[1,1],[1,-1]]) + kron(I, [[1,-1],[-1,-1]]); S has a zero
        # diagonal, so the second term only fills the diagonal 2x2 blocks.
        blocks = np.empty((q + 1, 2, q + 1, 2), dtype=np.int8)
        blocks[:, 0, :, 0] = blocks[:, 0, :, 1] = blocks[:, 1, :, 0] = s
        np.negative(s, out=blocks[:, 1, :, 1])
        blocks[diag, :, diag, :] = np.array([[1, -1], [-1, -1]], dtype=np.int8)
        core = blocks.reshape(2 * (q + 1), 2 * (q + 1))
    core.flags.writeable = False  # shared by every caller: hand out copies only
    return core


def _core(m: int) -> np.ndarray:
    kind, _, p, e = _core_table()[m]
    return np.ones((1, 1), dtype=np.int8) if m == 1 else _paley_core(kind, p, e)


def hadamard(n: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """Dense +-1 matrix ``kron(sylvester(p2), core(m))`` of order n (unnormalized), on ``device``."""
    p2, m, _ = hadamard_factors(n)
    syl = torch.ones(1, 1, dtype=dtype, device=device)
    while syl.shape[0] < p2:
        syl = torch.cat((torch.cat((syl, syl), 1), torch.cat((syl, -syl), 1)), 0)
    return torch.kron(syl, torch.tensor(_core(m), dtype=dtype, device=device))


def hadamard_transform(x: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
    """``x @ hadamard(n).T`` over the last dim (``/ sqrt(n)`` if normalize), fast.

    Cost is O(n (m + log2 p2)) per row instead of O(n^2); ``x`` is not modified.
    Half-precision inputs are computed in float32 and cast back.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("hadamard_transform expects a floating-point torch.Tensor")
    if x.dim() == 0:
        raise ValueError("hadamard_transform needs at least one dimension")
    n = x.shape[-1]
    p2, m, _ = hadamard_factors(n)
    work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    rows = math.prod(x.shape[:-1])
    y = x.to(work).reshape(rows, n)  # may alias x, so it is only ever read
    owned = m > 1
    if owned:
        core = torch.tensor(_core(m), dtype=work, device=x.device)
        y = (y.reshape(rows, p2, m) @ core.T).reshape(rows, n)
    # Index j = j1 * m + j2: the butterfly on bit `width // m` of j1 pairs
    # adjacent blocks of `width` entries, so every stage is a view.  Two
    # ping-pong buffers with out= avoid allocating (and page-faulting) per stage.
    spare = None
    width = m
    while width < n:
        if spare is None:
            spare = torch.empty((rows, n), dtype=work, device=x.device)
        src = y.reshape(rows, n // (2 * width), 2, width)
        dst = spare.view(rows, n // (2 * width), 2, width)
        torch.add(src[:, :, 0], src[:, :, 1], out=dst[:, :, 0])
        torch.sub(src[:, :, 0], src[:, :, 1], out=dst[:, :, 1])
        y, spare = spare, (y if owned else None)
        owned = True
        width *= 2
    if normalize:
        y = y.div_(math.sqrt(n)) if owned else y / math.sqrt(n)
    elif not owned:
        y = y.clone()
    return y.reshape(x.shape).to(x.dtype)


def random_signs(n: int, seed: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Deterministic +-1 vector of length n drawn from a generator seeded with ``seed``, on ``device``.

    Drawn by a CPU generator and moved, so the signs are the same on every device."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    signs = torch.randint(0, 2, (int(n),), generator=gen, device="cpu") * 2 - 1
    return signs.to(device=device, dtype=dtype)


def random_hadamard(n: int, seed: int, *, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Orthogonal ``Q = hadamard(n) @ diag(random_signs(n, seed)) / sqrt(n)``, on ``device``."""
    h = hadamard(n, dtype=torch.float64, device=device) * random_signs(n, seed, dtype=torch.float64, device=device)
    return (h / math.sqrt(n)).to(dtype)


def random_hadamard_transform(x: torch.Tensor, seed: int) -> torch.Tensor:
    """``x @ random_hadamard(n, seed).T`` via the fast transform of ``x * signs``."""
    signs = random_signs(x.shape[-1], seed, dtype=x.dtype, device=x.device)
    return hadamard_transform(x * signs)
