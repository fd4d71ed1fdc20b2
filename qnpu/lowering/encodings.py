"""Bit-level encodings of the Ascend quantized-matmul scale ("deq scale") and int4 packs.

The cube unit's dequantization epilogue reads a 64-bit word per output channel
(op-plugin ``npu_trans_quant_param``; docs/architecture.md, "Lowering"):

* bits 31..0: the fp32 scale, of which the hardware keeps only the top 19 bits (1 sign, 8
  exponent, 10 mantissa: "fp19"). ``round_mode=0`` truncates the 13 low bits, ``round_mode=1``
  rounds them to nearest-even (R_INT) **[derived: the docs name the mode, not the tie rule]**.
* bits 45..37: a 9-bit two's-complement output offset ``clamp(rint(offset), -256, 255)``, used
  only when the matmul writes int8.
* bit 46: set by ``npu_trans_quant_param`` (signed int8 output).

msModelSlim stores the raw fp32 bits zero-extended to int64 for non-bf16 models; the decode
below reads both encodings identically because only the top 19 bits of the low word matter.
"""
from __future__ import annotations

import torch

FP19_MASK = 0xFFFFE000
_OFFSET_SHIFT = 37
_SIGNED_BIT = 1 << 46


def _f32_bits(x: torch.Tensor) -> torch.Tensor:
    """IEEE bits of float32 ``x`` as int64 in [0, 2^32)."""
    return x.to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def _bits_f32(bits: torch.Tensor) -> torch.Tensor:
    """Inverse of `_f32_bits` for int64 values in [0, 2^32)."""
    signed = torch.where(bits >= 2**31, bits - 2**32, bits)
    return signed.to(torch.int32).view(torch.float32)


def fp19_bits(scale: torch.Tensor, round_mode: int = 0) -> torch.Tensor:
    """Top-19-bit image of the fp32 ``scale`` as int64 bits (truncated, or rounded half-to-even)."""
    bits = _f32_bits(scale)
    if round_mode == 1:
        lsb = (bits >> 13) & 1
        bits = torch.clamp(bits + 0xFFF + lsb, max=0xFFFFFFFF)
    return bits & FP19_MASK


def fp19(scale: torch.Tensor, round_mode: int = 0) -> torch.Tensor:
    """``view_f32(view_i32(f32(s)) & 0xFFFFE000)`` (``round_mode=0``): the scale the cube applies."""
    return _bits_f32(fp19_bits(scale, round_mode))


def encode_deq_scale(scale: torch.Tensor, offset: torch.Tensor | None = None, round_mode: int = 0) -> torch.Tensor:
    """The int64 word of ``npu_trans_quant_param``: fp19 scale | 1 << 46 | 9-bit offset << 37."""
    word = fp19_bits(scale, round_mode) | _SIGNED_BIT
    if offset is not None:
        off = torch.clamp(torch.round(offset.to(torch.float32)), -256, 255).to(torch.int64) & 0x1FF
        word = word | (off << _OFFSET_SHIFT)
    return word


def decode_deq_scale(word: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fp32 scale, fp32 offset)`` read from int64 deq-scale words (either encoding)."""
    w = word.to(torch.int64)
    scale = _bits_f32(w & FP19_MASK)
    off = (w >> _OFFSET_SHIFT) & 0x1FF
    off = torch.where(off >= 256, off - 512, off)
    return scale, off.to(torch.float32)
