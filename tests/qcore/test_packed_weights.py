"""Packed binarized (BiLLM) and mixed-precision (SliM-LLM) weights: dense bit streams, exact
storage round trips, and byte counts computed here from the layouts' definitions."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qnpu.qcore import BiLLMTensor, MixedTensor, QSpec, pack_bitstream, packed_from_tensors, unpack_bitstream


@given(bits=st.integers(1, 8), n=st.integers(0, 70), seed=st.integers(0, 2**31 - 1))
def test_bitstream_round_trip_and_size(bits, n, seed):
    v = torch.randint(0, 2 ** bits, (n,), generator=torch.Generator().manual_seed(seed))
    p = pack_bitstream(v, bits)
    assert p.dtype == torch.uint8 and p.numel() == -(-n * bits // 8)
    assert torch.equal(unpack_bitstream(p, bits, n), v)


def test_bitstream_order_is_lsb_first():
    assert pack_bitstream(torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1]), 1).tolist() == [0b1101, 1]
    assert pack_bitstream(torch.tensor([5, 2, 7]), 3).tolist() == [5 | 2 << 3 | (7 & 3) << 6, 7 >> 2]
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        pack_bitstream(torch.tensor([8]), 3)
    with pytest.raises(ValueError, match="takes 2 uint8 bytes"):
        unpack_bitstream(torch.zeros(1, dtype=torch.uint8), 3, 4)


def random_billm(seed: int, out: int, n_in: int, block: int, split: bool, offsets: bool, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    sign = lambda *s: (torch.randint(0, 2, s, generator=g) * 2 - 1).to(torch.int8)  # noqa: E731
    salient = torch.rand(n_in, generator=g) < 0.2
    n_s = int(salient.sum())
    sparse = (torch.rand(out, n_in, generator=g) < 0.3) & ~salient & split
    nb = -(-n_in // block)
    scale, offset = torch.rand(4, out, nb, generator=g, dtype=dtype), torch.randn(4, out, nb, generator=g, dtype=dtype)
    unused = ([] if n_s else [0, 1]) + ([] if split else [3])
    scale[unused], offset[unused] = 0, 0
    if not offsets:
        offset.zero_()
    return BiLLMTensor(sign(out, n_in), sign(out, n_s), salient, sparse, scale, offset, block, split, offsets,
                       torch.bfloat16)


def billm_bytes(q: BiLLMTensor) -> int:
    out, n_in = q.shape
    n_s = int(q.salient.sum())
    planes = [out * n_in, out * n_s, n_in] + ([out * (n_in - n_s)] if q.split else [])
    used = (2 if n_s else 0) + 1 + q.split
    params = used * out * -(-n_in // q.block_size) * q.scale.element_size()
    return sum(-(-p // 8) for p in planes) + params * (1 + q.mean_offsets)


def stored(q) -> int:
    return sum(t.numel() * t.element_size() for t in q.to_tensors().values())


def round_trip(q):
    back = packed_from_tensors(q.layout, q.to_tensors(), q.layout_meta(), q.spec, q.dtype)
    assert type(back) is type(q) and back.dtype == q.dtype
    return back


@settings(max_examples=25)
@given(seed=st.integers(0, 2**31 - 1), out=st.integers(1, 9), n_in=st.integers(1, 40),
       block=st.sampled_from([3, 8, 128]), split=st.booleans(), offsets=st.booleans())
def test_billm_storage_is_exact_and_counted(seed, out, n_in, block, split, offsets):
    q = random_billm(seed, out, n_in, block, split, offsets)
    back = round_trip(q)
    for name in ("codes", "residual_codes", "salient", "sparse", "scale", "offset"):
        assert torch.equal(getattr(back, name), getattr(q, name)), name
    assert torch.equal(back.dequantize(), q.dequantize())
    assert q.packed_nbytes == billm_bytes(q) == stored(q)


def random_mixed(seed: int, out: int, group_bits: list[int], gs: int, spec: QSpec, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    n = len(group_bits)
    codes = torch.empty(out, n * gs, dtype=torch.int16)
    zp = torch.zeros(out, n, dtype=torch.int32)
    mean = torch.zeros(out, n, dtype=dtype)
    for i, b in enumerate(group_bits):
        cols = slice(i * gs, (i + 1) * gs)
        if b == 1:
            codes[:, cols] = torch.randint(0, 2, (out, gs), generator=g) * 2 - 1
            mean[:, i] = torch.randn(out, generator=g, dtype=dtype)
            continue
        s = spec.replace(bits=b)
        codes[:, cols] = torch.randint(s.qmin, s.qmax + 1, (out, gs), generator=g)
        zp[:, i] = s.symmetric_zero if s.symmetric else torch.randint(s.qmin, s.qmax + 1, (out,), generator=g)
    scale = torch.rand(out, n, generator=g, dtype=dtype) + 0.01
    return MixedTensor(codes, torch.tensor(group_bits, dtype=torch.int32), scale, zp, mean, gs, spec)


def mixed_bytes(q: MixedTensor) -> int:
    out = q.shape[0]
    bits = q.group_bits.tolist()
    e = q.scale.element_size()
    codes = sum(-(-out * q.group_size * b // 8) for b in bits)
    ones = bits.count(1)
    asym = 0 if q.spec.symmetric else len(bits) - ones
    return codes + len(bits) + out * len(bits) * e + out * asym + out * ones * e


SPECS = [QSpec(bits=2, symmetric=False, format="uint"), QSpec(bits=3, symmetric=False, format="int"),
         QSpec(bits=3, format="uint"), QSpec(bits=4, full_range=True)]


@settings(max_examples=25)
@given(seed=st.integers(0, 2**31 - 1), out=st.integers(1, 7), gs=st.integers(1, 9),
       bits=st.lists(st.integers(1, 8), min_size=1, max_size=5), spec=st.sampled_from(SPECS))
def test_mixed_storage_is_exact_and_counted(seed, out, gs, bits, spec):
    q = random_mixed(seed, out, bits, gs, spec)
    back = round_trip(q)
    for name in ("codes", "group_bits", "scale", "zero_point", "mean"):
        assert torch.equal(getattr(back, name), getattr(q, name)), name
    assert torch.equal(back.dequantize(), q.dequantize())
    assert q.packed_nbytes == mixed_bytes(q) == stored(q)


def test_mixed_dequantize_per_group():
    spec = QSpec(bits=2, symmetric=False, format="uint")
    q = random_mixed(3, 4, [1, 3], 5, spec)
    w = q.dequantize()
    one = q.mean[:, :1] + q.scale[:, :1] * q.codes[:, :5].float()
    three = (q.codes[:, 5:].float() - q.zero_point[:, 1:].float()) * q.scale[:, 1:]
    assert torch.equal(w, torch.cat([one, three], 1))
    assert q.mean_bits == 2.0


def test_inconsistent_values_are_refused():
    q = random_billm(0, 4, 16, 8, split=False, offsets=True)
    with pytest.raises(ValueError, match="split is False"):
        BiLLMTensor(q.codes, q.residual_codes, q.salient, ~q.salient.expand(4, 16), q.scale, q.offset, 8,
                    False, True)
    with pytest.raises(ValueError, match=r"\{-1, \+1\}"):
        BiLLMTensor(q.codes * 0, q.residual_codes, q.salient, q.sparse, q.scale, q.offset, 8, False, True)
    m = random_mixed(0, 3, [1, 2], 4, SPECS[0])
    with pytest.raises(ValueError, match="group 0"):
        MixedTensor(m.codes * 0, m.group_bits, m.scale, m.zero_point, m.mean, 4, m.spec)
    with pytest.raises(ValueError, match="bytes"):
        t = m.to_tensors()
        packed_from_tensors("mixed", {**t, "codes": t["codes"][:-1]}, m.layout_meta(), m.spec, m.dtype)
    with pytest.raises(ValueError, match="unknown weight layout"):
        packed_from_tensors("ternary", {}, {}, None, torch.float32)
