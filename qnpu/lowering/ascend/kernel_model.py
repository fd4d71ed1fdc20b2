"""Numerics model of qnpu's CATLASS kernels for Atlas A2 (``lowering/ascend/csrc``), runnable anywhere.

The kernels cannot run here (no CANN); this module computes, with plain torch on CPU, what they
compute on an A2, step by step in the kernels' own order, so their numerics are tested against the
reference ops (docs/architecture.md, "CATLASS kernels"):

``w8a8_per_token`` (``csrc/kernels/w8a8_per_token.cpp``; CATLASS example ``12_quant_matmul``)
    Each output block (L1 tile M x N) accumulates int8 x int8 products over the K tiles in the
    L0C buffer as int32 (exact: ``|sum| <= 65535 * 128^2 < 2^31``). The AIV epilogue then casts
    int32 -> fp32 with round-half-even (``CAST_RINT``), multiplies by ``scale[n]`` and
    ``pertoken[m]`` in fp32 and casts to fp16/bf16 with round-half-even. Example 12's epilogue has
    no bias: the torch wrapper (``csrc/torch_ops.cpp``) adds a bias afterwards, in fp32, and
    rounds again (`add_bias`).

``w4a8`` (``csrc/kernels/w4a8.cpp``; the int4 -> int8 prologue of example ``32_w4a8_matmul``)
    The AIV cores widen each int4 weight tile to int8 in a workspace; the cube multiplies int8 x
    int8. Per channel (``group_size == 0``) the numerics are the W8A8 path above (qnpu's epilogue
    with one group performs CATLASS's fp32 steps in the same order). Per group, each K
    group is one block-level matmul whose exact int32 result goes to a workspace; qnpu's AIV
    epilogue (``csrc/include/epilogue_group_dequant.hpp``) keeps an fp32 accumulator per block
    row and, group after group, adds ``fp32(C_g) * scale[g, n]`` (each product and each sum
    rounded to fp32), then multiplies by ``pertoken`` and casts.
    ``accumulate="fp16"`` models the alternative the kernel does not take: the fixpipe's
    per-channel dequantization (``VDEQF16``: ``fp16(int32 * fp19(scale))``) with fp16 atomic adds
    across groups, as the golden of example ``36_w4a8_matmul_msd`` does
    (``benchmarks/kernel_model_accuracy.py`` measures both).

Where the hardware's rounding is not documented the model states its assumption **[derived]**:
the fixpipe multiplies in fp32 and rounds once to fp16 (round-half-even); the fp16 atomic add
rounds the exact sum of two fp16 values once. `catlass_errors` is CATLASS's golden criterion
(``examples/common/golden/compare_data.hpp``): ``|actual - golden| <= rtol * max(1, |golden|)``
with ``rtol = 1/256`` for ``k < 2048`` and ``1/128`` otherwise; for bf16 results (``CompareDataBfloat16``)
``rtol = 1/128`` or ``1/64`` and the floor ``max(1/256, |golden|)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qnpu.qcore import unpack_int4

from ..encodings import fp19

KIB = 1024
A2_BUFFERS = {"L1": 512 * KIB, "L0A": 64 * KIB, "L0B": 64 * KIB, "L0C": 128 * KIB, "UB": 192 * KIB}
CUBE_K_FRACTAL_INT8 = 32          # an int8 fractal is 16 x 32 (K) x 16
INT32_MAX = 2**31 - 1
FP16_MAX = 65504.0


class TilingError(ValueError):
    """A tile shape that does not fit the A2 buffers or the cube's fractals."""


@dataclass(frozen=True)
class Tiling:
    """Tile shapes and buffer stages of one kernel (the C++ ``L1TileShape``, ``L0TileShape``,
    ``EpilogueTileShape`` and stage constants); `buffers` gives the bytes each buffer holds."""

    name: str
    l1: tuple[int, int, int]            # (M, N, K)
    l0: tuple[int, int, int]
    epilogue: tuple[int, int]           # (rows, cols) per UB stage
    l1_stages: int = 2
    l0a_stages: int = 2
    l0b_stages: int = 2
    l0c_stages: int = 1
    ub_stages: int = 2
    workspace_stages: int = 2
    prologue_cast_len: int = 0          # W4A8: TileCastInt4ToInt8's COMPUTE_LEN (0: no prologue)

    def buffers(self) -> dict[str, int]:
        """Bytes used per buffer: int8 A/B tiles, int32 L0C and UB. UB without a prologue: CATLASS's
        per-token epilogue (int32 C, fp32 scale / per-token rows, fp16 D per stage; fp32 temporaries).
        With the int4 -> int8 prologue: the cast's two stages of int4 in, int8 out and fp16 work
        (7 x COMPUTE_LEN bytes from offset 0, held for the whole kernel) under qnpu's group epilogue
        (half the block's rows of fp32 accumulator, one tile of int32 and fp32 C, the scale row)."""
        (m1, n1, k1), (m0, n0, k0), (er, ec) = self.l1, self.l0, self.epilogue
        if self.prologue_cast_len:
            ub = 7 * self.prologue_cast_len + (m1 // 2) * n1 * 4 + er * ec * 8 + n1 * 4
        else:
            per_stage = er * ec * 4 + ec * 4 + er * 4 + ec * 4 + er * ec * 2
            ub = self.ub_stages * per_stage + er * ec * 4 * 2 + ec * 4 + er * 4 + er * 32
        return {"L1": self.l1_stages * (m1 * k1 + k1 * n1), "L0A": self.l0a_stages * m0 * k0,
                "L0B": self.l0b_stages * k0 * n0, "L0C": self.l0c_stages * m0 * n0 * 4, "UB": ub}

    def check(self) -> None:
        """Raise `TilingError` unless the tiles nest, align to the int8 fractal and fit A2."""
        (m1, n1, k1), (m0, n0, k0) = self.l1, self.l0
        if (m0, n0) != (m1, n1) or k1 % k0:
            raise TilingError(f"{self.name}: L0 tile {self.l0} must share M, N with L1 {self.l1} and divide its K")
        if any(d % 16 for d in (m1, n1)) or k0 % CUBE_K_FRACTAL_INT8:
            raise TilingError(f"{self.name}: M, N must be multiples of 16 and K of {CUBE_K_FRACTAL_INT8}")
        if m1 % self.epilogue[0] or n1 % self.epilogue[1]:
            raise TilingError(f"{self.name}: epilogue tile {self.epilogue} must divide the block {self.l1[:2]}")
        for buf, used in self.buffers().items():
            if used > A2_BUFFERS[buf]:
                raise TilingError(f"{self.name}: {buf} needs {used} bytes, the A2 has {A2_BUFFERS[buf]}")


# Chosen for the openPangu-Embedded 1B/7B linears (K and N are multiples of 256 there): a
# 128 x 256 block fills L0C (128 KiB of int32) exactly, K = 512 per L1 stage keeps two stages of
# A and B in 384 KiB of L1, and L0 K = 128 double-buffers L0A / L0B within 64 KiB.
W8A8_TILING = Tiling("w8a8_per_token", l1=(128, 256, 512), l0=(128, 256, 128), epilogue=(32, 256))
# The cast widens 32 rows of the (K, 256) tile per pass: a COMPUTE_LEN of 32 x 256 leaves UB room for
# the group epilogue above it (example 32's 24 Ki would take 168 of the 192 KiB).
W4A8_TILING = Tiling("w4a8", l1=(128, 256, 512), l0=(128, 256, 128), epilogue=(32, 256), prologue_cast_len=32 * 256)


def _exact_tile_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact integer product of an int8-valued (m, kt) and (kt, n) tile (kt <= 1024) as int64."""
    return torch.matmul(a.to(torch.float32), b.to(torch.float32)).to(torch.int64)


def l0c_accumulate(a: torch.Tensor, b: torch.Tensor, k_tile: int) -> torch.Tensor:
    """The int32 L0C sum of ``a @ b`` over K tiles of ``k_tile`` (the last one short), as int64.

    Raises OverflowError where a partial sum would leave int32 (the cube would wrap)."""
    acc = torch.zeros(a.shape[0], b.shape[1], dtype=torch.int64)
    for k0 in range(0, a.shape[1], k_tile):
        acc += _exact_tile_product(a[:, k0:k0 + k_tile], b[k0:k0 + k_tile])
        if acc.numel() and int(acc.abs().max()) > INT32_MAX:
            raise OverflowError("an int32 L0C partial sum overflows")
    return acc


def _epilogue(c: torch.Tensor, pertoken: torch.Tensor, out: torch.dtype, scale=None) -> torch.Tensor:
    """AIV epilogue: fp32 (rint) -> (* scale[n]) -> * pertoken[m] -> rint cast."""
    y = c.to(torch.float32)
    if scale is not None:
        y = y * scale.to(torch.float32)
    return (y * pertoken.to(torch.float32).unsqueeze(-1)).to(out)


def add_bias(y: torch.Tensor, bias) -> torch.Tensor:
    """The wrapper's bias: ``rint_cast(fp32(y) + bias)``, after the kernel's own rounding."""
    return y if bias is None else (y.to(torch.float32) + bias.to(torch.float32)).to(y.dtype)


def w8a8_per_token(x1, x2, scale, pertoken, bias=None, output_dtype=torch.float16, tiling: Tiling = W8A8_TILING):
    """The W8A8 per-token kernel: int8 ``x1 (m, k)`` x int8 ``x2 (k, n)``, ``scale (n,)``,
    ``pertoken (m,)``, optional ``bias (n,)``, fp16/bf16 output (module docstring)."""
    c = l0c_accumulate(x1, x2, tiling.l1[2])
    return add_bias(_epilogue(c, pertoken, output_dtype, scale), bias)


def round_fp16(x: torch.Tensor) -> torch.Tensor:
    """Float64 ``x`` rounded once, half to even, to fp16 (torch's float64 -> float16 conversion
    goes through float32 and can round twice). Raises OverflowError beyond the fp16 range."""
    if x.numel() and float(x.abs().max()) > FP16_MAX:
        raise OverflowError(f"a value of magnitude {float(x.abs().max()):.6g} leaves the fp16 range")
    _, e = torch.frexp(x)                                     # |x| in [2^(e-1), 2^e)
    step_exp = torch.clamp(e.to(torch.int64) - 11, min=-24)   # 11 significant bits; subnormal step 2^-24
    step = torch.ldexp(torch.ones_like(x), step_exp.to(x.dtype))
    return (torch.round(x / step) * step).to(torch.float16)   # exactly representable: the cast is exact


def _fixpipe_vdeqf16(c: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int32 L0C tile -> fp16 with a per-channel fp19 scale **[derived: the exact product, rounded once]**.
    ``|c| <= 256 * 128 * 8 = 2^18`` and fp19 has 11 significant bits, so float64 holds the product."""
    return round_fp16(c.to(torch.float64) * fp19(scale).to(torch.float64))


def _atomic_add_fp16(acc: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """fp16 atomic add in the workspace: the exact sum of two fp16 values (exact in float64), rounded once."""
    return round_fp16(acc.to(torch.float64) + part.to(torch.float64))


def w4a8(x1, x2, scale, pertoken, bias=None, group_size: int = 0, output_dtype=torch.float16,
         tiling: Tiling = W4A8_TILING, accumulate: str = "fp32"):
    """The dense W4A8 kernel, arguments as ``qnpu::w4a8_matmul`` (module docstring)."""
    w = unpack_int4(x2, dim=-1)                      # the AIV prologue's int4 -> int8 widening
    if group_size == 0:
        return add_bias(_epilogue(l0c_accumulate(x1, w, tiling.l1[2]), pertoken, output_dtype, scale), bias)
    if accumulate not in ("fp32", "fp16"):
        raise ValueError(f"accumulate must be 'fp32' (the kernel) or 'fp16' (the fixpipe alternative); got {accumulate!r}")
    acc = None
    for g in range(scale.shape[0]):                  # one block matmul per K group, in group order
        ks = slice(g * group_size, (g + 1) * group_size)
        c = l0c_accumulate(x1[:, ks], w[ks], tiling.l1[2])
        if accumulate == "fp32":
            part = c.to(torch.float32) * scale[g].to(torch.float32)
            acc = part if acc is None else acc + part
        else:
            part = _fixpipe_vdeqf16(c, scale[g])
            acc = part if acc is None else _atomic_add_fp16(acc, part)
    return add_bias(_epilogue(acc, pertoken, output_dtype), bias)


def catlass_tolerance(k: int, dtype: torch.dtype = torch.float16) -> tuple[float, float]:
    """CATLASS's golden ``(rtol, floor)`` for a reduction of length ``k`` and an output dtype."""
    if dtype == torch.bfloat16:
        return (1.0 / 128 if k < 2048 else 1.0 / 64), 1.0 / 256
    return (1.0 / 256 if k < 2048 else 1.0 / 128), 1.0


def catlass_errors(actual: torch.Tensor, golden: torch.Tensor, k: int) -> int:
    """How many elements fail CATLASS's golden check ``|a - g| <= rtol * max(floor, |g|)``
    (the rule of ``actual``'s dtype)."""
    rtol, floor = catlass_tolerance(k, actual.dtype)
    a, g = actual.to(torch.float64), golden.to(torch.float64)
    return int(((a - g).abs() > rtol * torch.clamp(g.abs(), min=floor)).sum())
