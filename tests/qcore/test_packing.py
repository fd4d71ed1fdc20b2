import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qnpu.qcore import (
    pack_bits,
    pack_int2,
    pack_int4,
    pack_int4_pairs,
    unpack_bits,
    unpack_int2,
    unpack_int4,
    unpack_int4_pairs,
)


@st.composite
def codes(draw, lo, hi, multiple, dim_choices=(0, 1)):
    dim = draw(st.sampled_from(dim_choices))
    shape = [draw(st.integers(1, 6)), draw(st.integers(1, 6))]
    shape[dim] *= multiple
    seed = draw(st.integers(0, 2**32 - 1))
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, shape, generator=g, dtype=torch.int8), dim


@given(codes(-8, 7, 8))
def test_int4_round_trip(case):
    c, dim = case
    packed = pack_int4(c, dim=dim)
    assert packed.dtype == torch.int32 and packed.shape[dim] == c.shape[dim] // 8
    assert torch.equal(unpack_int4(packed, dim=dim), c)


@given(codes(-2, 1, 16))
def test_int2_round_trip(case):
    c, dim = case
    assert torch.equal(unpack_int2(pack_int2(c, dim=dim), dim=dim), c)


@given(codes(-8, 7, 2, dim_choices=(0,)))
def test_int4_pairs_round_trip(case):
    c, _ = case
    packed = pack_int4_pairs(c)
    assert packed.dtype == torch.int8 and packed.shape == (c.shape[0] // 2, c.shape[1])
    assert torch.equal(unpack_int4_pairs(packed), c)


@given(st.sampled_from([1, 2, 4, 8]), st.sampled_from([torch.int8, torch.int16, torch.int32]),
       st.booleans(), st.integers(0, 2**32 - 1))
def test_generic_round_trip_signed_and_unsigned(bits, container, signed, seed):
    width = {torch.int8: 8, torch.int16: 16, torch.int32: 32}[container]
    if bits > width:
        return
    per = width // bits
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(lo, hi + 1, (3, 2 * per), generator=g)
    back = unpack_bits(pack_bits(c, bits, container=container), bits, signed=signed)
    assert torch.equal(back.to(torch.int64), c)


def test_int4_layout_is_lsb_first():
    # element i of each run of 8 sits in bits [4i, 4i + 3]
    c = torch.tensor([[1, 2, 3, 4, 5, 6, 7, -8]], dtype=torch.int8)
    word = int(pack_int4(c)[0, 0]) & 0xFFFFFFFF
    assert word == 0x87654321


def test_int4_pairs_byte_formula():
    w = torch.tensor([[3, -1], [-2, 7]], dtype=torch.int8)  # [out=2, in=2]
    packed = pack_int4_pairs(w)
    expected = [((-2 << 4) | (3 & 0xF)), ((7 << 4) | (-1 & 0xF))]
    assert [int(b) & 0xFF for b in packed[0]] == [e & 0xFF for e in expected]


def test_bad_packing_input_is_rejected():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_int4(torch.zeros(2, 7, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.full((1, 8), 8, dtype=torch.int8))
    with pytest.raises(ValueError, match="bits=3"):
        pack_bits(torch.zeros(1, 8, dtype=torch.int8), 3)
    with pytest.raises(ValueError, match="integer"):
        pack_bits(torch.zeros(1, 8), 4)
