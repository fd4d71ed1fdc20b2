"""The w4a16-hqq recipe through the whole pipeline on a tiny Llama: the data-free fast path (no
calibration pass), only the quantized linears' weights change, float zero points survive a
checkpoint bit for bit, and the reference lowering (W4A16 with a float antiquant_offset) computes
the simulated model's dequantized weights."""
from __future__ import annotations

import pytest
import torch
from qnpu.lowering import WeightOnlyLinear, lower, plan
from qnpu.models import load_quantized, quantize_model, save_quantized
from qnpu.models.engine import ERROR_SAMPLE
from qnpu.models.qlinear import QLinear
from qnpu.qcore import dequantize
from qnpu.transforms import recipes

from .test_data_free import block_rows, many_ids
from .test_engine import logits, relative, tiny_llama

GROUP = 32  # npu_weight_quant_batchmatmul takes groups that are multiples of 32 below K


@pytest.fixture(scope="module")
def quantized():
    model, ids = tiny_llama(2, tied=True), many_ids()
    float_state = {k: v.clone() for k, v in model.state_dict().items()}
    rows = block_rows(model)
    result = quantize_model(model, recipes.get("w4a16-hqq", group_size=GROUP), ids, progress=False)
    return result, float_state, rows, ids


def test_takes_the_data_free_path(quantized):
    result, _, rows, ids = quantized
    sample = min(ERROR_SAMPLE[0], ids.shape[0]) * min(ERROR_SAMPLE[1], ids.shape[1])
    assert result.data_free and result.error_sample_tokens == sample
    assert rows[1:] == [2 * sample], rows  # one float and one quantized pass over the error sample only


def test_only_the_quantized_linears_weights_change(quantized):
    result, float_state, _, ids = quantized
    model = result.model
    qlinears = {n: m for n, m in model.named_modules() if isinstance(m, QLinear)}
    assert len(qlinears) == 2 * 7
    for key, value in model.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if owner in qlinears and key.endswith(".weight"):
            q = qlinears[owner].qweight
            assert q.spec.zero_point_domain == "float" and q.zero_point.is_floating_point()
            assert torch.equal(value, q.dequantize(value.dtype)) and not torch.equal(value, float_state[key])
        else:
            assert torch.equal(value, float_state[key]), key
    # the float model with each linear's weight replaced by its dequantized value computes the same logits
    twin = tiny_llama(2, tied=True)
    twin.load_state_dict(float_state)
    with torch.no_grad():
        for name, m in qlinears.items():
            twin.get_submodule(name).weight.copy_(dequantize(m.qweight))
    assert torch.equal(logits(twin, ids[:2]), logits(model, ids[:2]))


def test_float_zero_points_survive_a_checkpoint(quantized, tmp_path):
    result, _, _, ids = quantized
    path = save_quantized(result, tmp_path / "hqq", source={"name": "tiny"},
                          recipe=recipes.get("w4a16-hqq", group_size=GROUP))
    back = load_quantized(path)
    ours = {n: m for n, m in result.model.named_modules() if isinstance(m, QLinear)}
    theirs = {n: m for n, m in back.named_modules() if isinstance(m, QLinear)}
    assert ours.keys() == theirs.keys()
    for n, m in ours.items():
        a, b = m.qweight, theirs[n].qweight
        assert b.spec == a.spec and b.zero_point.dtype == a.zero_point.dtype
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point)
    assert torch.equal(logits(back, ids[:2]), logits(result.model, ids[:2]))


def test_reference_lowering_is_w4a16_with_the_float_offset(quantized):
    result, _, _, ids = quantized
    model = result.model
    assert set(plan(model).values()) == {"W4A16"}
    low = lower(model)
    lowered = dict(low.named_modules())
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0))
    for name, m in model.named_modules():
        if not isinstance(m, QLinear):
            continue
        lm = lowered[name]
        assert isinstance(lm, WeightOnlyLinear) and lm.group_size == GROUP
        q = m.qweight
        # uint4 codes move into int4 (c - 8), so the offset is 8 - z, unrounded, in the model dtype
        assert torch.equal(lm.antiquant_offset, (8 - q.zero_point.float()).t().contiguous())
        xin = x if x.shape[-1] == m.in_features else torch.randn(3, 5, m.in_features)
        with torch.no_grad():
            assert relative(lm(xin), m(xin)) <= 1e-6, name
    assert relative(logits(low, ids[:2]), logits(model, ids[:2])) <= 1e-5
