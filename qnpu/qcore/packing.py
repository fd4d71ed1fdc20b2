"""Bit packing of low-bit codes, with exact inverses.

Layouts (docs/architecture.md, "Lowering" and "Exports"):

* `pack_int4`: 8 signed int4 values per int32 along ``dim``, element ``i`` of each run of 8 in
  bits ``[4i, 4i + 3]`` (LSB first): the layout of ``torch_npu.npu_convert_weight_to_int4pack``
  and the int4 inputs of ``npu_weight_quant_batchmatmul`` / ``npu_quant_matmul``.
* `pack_int2`: 16 int2 values per int32, same LSB-first order.
* `pack_int4_pairs`: two int4 values along the *output* dim into one int8,
  ``byte = (w[2j+1] << 4) | (w[2j] & 0xF)``: msModelSlim's AscendV1 W4A8 weight ``[out/2, in]``.

`pack_bits` / `unpack_bits` are the general LSB-first packers for 1, 2, 4 or 8 bits into int8,
int16 or int32 containers.
"""
from __future__ import annotations

import torch

_CONTAINER_BITS = {torch.int8: 8, torch.int16: 16, torch.int32: 32}


def _check_args(bits: int, container: torch.dtype) -> int:
    if container not in _CONTAINER_BITS:
        raise ValueError(f"container={container} is invalid; allowed: torch.int8 | torch.int16 | torch.int32")
    width = _CONTAINER_BITS[container]
    if bits not in (1, 2, 4, 8) or bits > width:
        raise ValueError(f"bits={bits} is invalid for a {width}-bit container; allowed: 1, 2, 4, 8 (<= {width})")
    return width // bits


def _wrap(v: torch.Tensor, width: int, container: torch.dtype) -> torch.Tensor:
    """Reinterpret non-negative int64 values < 2^width as two's-complement ``container`` values."""
    return torch.where(v >= (1 << (width - 1)), v - (1 << width), v).to(container)


def pack_bits(codes: torch.Tensor, bits: int, *, dim: int = -1, container: torch.dtype = torch.int32) -> torch.Tensor:
    """Pack integer ``codes`` (signed or unsigned, ``bits`` wide) LSB-first along ``dim``.

    ``codes.shape[dim]`` must be a multiple of ``width(container) / bits``; the result has that
    dim divided by it. Only the low ``bits`` of each code are kept, so signed and unsigned
    codes pack the same way and `unpack_bits` chooses how to read them back.
    """
    per = _check_args(bits, container)
    if codes.is_floating_point():
        raise ValueError(f"codes must be an integer tensor; got {codes.dtype}")
    dim = dim % codes.ndim
    n = codes.shape[dim]
    if n % per:
        raise ValueError(f"codes.shape[{dim}]={n} must be a multiple of {per} to pack {bits}-bit values "
                         f"into {container}")
    v = codes.to(torch.int64).movedim(dim, -1).unflatten(-1, (n // per, per)) & ((1 << bits) - 1)
    shifts = torch.arange(per, dtype=torch.int64, device=v.device) * bits
    word = (v << shifts).sum(-1)
    return _wrap(word, _CONTAINER_BITS[container], container).movedim(-1, dim)


def unpack_bits(packed: torch.Tensor, bits: int, *, dim: int = -1, signed: bool = True) -> torch.Tensor:
    """Exact inverse of `pack_bits`: int8 codes (sign-extended if ``signed``, else uint8)."""
    per = _check_args(bits, packed.dtype)
    width = _CONTAINER_BITS[packed.dtype]
    dim = dim % packed.ndim
    word = packed.to(torch.int64).movedim(dim, -1) & ((1 << width) - 1)
    shifts = torch.arange(per, dtype=torch.int64, device=word.device) * bits
    v = (word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    if signed:
        v = torch.where(v >= (1 << (bits - 1)), v - (1 << bits), v)
    out = v.flatten(-2).movedim(-1, dim)
    return out.to(torch.int8 if signed else torch.uint8)


def _check_range(codes: torch.Tensor, lo: int, hi: int, name: str) -> None:
    if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
        raise ValueError(f"{name}: values must lie in [{lo}, {hi}]; got [{int(codes.min())}, {int(codes.max())}]")


def pack_int4(codes: torch.Tensor, *, dim: int = -1) -> torch.Tensor:
    """Signed int4 codes in [-8, 7] -> int32, 8 per word along ``dim`` (torch_npu int4pack layout)."""
    _check_range(codes, -8, 7, "pack_int4")
    return pack_bits(codes, 4, dim=dim, container=torch.int32)


def unpack_int4(packed: torch.Tensor, *, dim: int = -1) -> torch.Tensor:
    """Inverse of `pack_int4`."""
    return unpack_bits(packed, 4, dim=dim, signed=True)


def pack_int2(codes: torch.Tensor, *, dim: int = -1) -> torch.Tensor:
    """Signed int2 codes in [-2, 1] -> int32, 16 per word along ``dim``, LSB first."""
    _check_range(codes, -2, 1, "pack_int2")
    return pack_bits(codes, 2, dim=dim, container=torch.int32)


def unpack_int2(packed: torch.Tensor, *, dim: int = -1) -> torch.Tensor:
    """Inverse of `pack_int2`."""
    return unpack_bits(packed, 2, dim=dim, signed=True)


def pack_int4_pairs(codes: torch.Tensor) -> torch.Tensor:
    """AscendV1 W4A8 layout: int4 weight ``[out, in]`` -> int8 ``[out/2, in]``.

    ``byte[j, k] = (w[2j+1, k] << 4) | (w[2j, k] & 0xF)``, i.e. `pack_bits` with 4 bits into
    int8 along dim 0.
    """
    _check_range(codes, -8, 7, "pack_int4_pairs")
    if codes.ndim != 2:
        raise ValueError(f"pack_int4_pairs expects a 2-d [out, in] weight; got shape {tuple(codes.shape)}")
    return pack_bits(codes, 4, dim=0, container=torch.int8)


def unpack_int4_pairs(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4_pairs`: int8 ``[out/2, in]`` -> int4 codes ``[out, in]``."""
    if packed.dtype != torch.int8 or packed.ndim != 2:
        raise ValueError(f"unpack_int4_pairs expects a 2-d int8 tensor; got {packed.dtype} {tuple(packed.shape)}")
    return unpack_bits(packed, 4, dim=0, signed=True)


def pack_bitstream(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``values`` (any shape, each in ``[0, 2^bits)``, ``bits`` in 1..8) as one LSB-first
    bit stream in uint8: value ``k`` (row-major order) occupies stream bits ``[k * bits, (k + 1) * bits)``,
    stream bit ``t`` is bit ``t % 8`` of byte ``t // 8``; the last byte is zero-padded.
    ``ceil(values.numel() * bits / 8)`` bytes. Unlike `pack_bits`, any width (3, 5, 6, 7) packs densely."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits={bits!r} is invalid; allowed: an int in 1..8")
    if values.is_floating_point():
        raise ValueError(f"values must be an integer or bool tensor; got {values.dtype}")
    v = values.reshape(-1).to(torch.int64)
    _check_range(v, 0, (1 << bits) - 1, "pack_bitstream")
    stream = ((v.unsqueeze(-1) >> torch.arange(bits, device=v.device)) & 1).reshape(-1)
    stream = torch.nn.functional.pad(stream, (0, -stream.numel() % 8))
    return (stream.reshape(-1, 8) << torch.arange(8, device=v.device)).sum(-1).to(torch.uint8)


def unpack_bitstream(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Exact inverse of `pack_bitstream`: the first ``count`` values (int64, flat). ValueError when
    ``packed`` is not a uint8 vector of exactly ``ceil(count * bits / 8)`` bytes."""
    need = (count * bits + 7) // 8
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != need:
        raise ValueError(f"a {bits}-bit stream of {count} values takes {need} uint8 bytes; got "
                         f"{str(packed.dtype).removeprefix('torch.')} of shape {tuple(packed.shape)}")
    stream = ((packed.to(torch.int64).unsqueeze(-1) >> torch.arange(8, device=packed.device)) & 1).reshape(-1)[: count * bits]
    return (stream.reshape(count, bits) << torch.arange(bits, device=packed.device)).sum(-1)
