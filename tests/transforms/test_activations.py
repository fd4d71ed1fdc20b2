import pytest
import torch

from qnpu.qcore import QSpec, quantize
from qnpu.testing import random_block
from qnpu.transforms import TransformError, chain, quant_specs, state_from_dict, state_to_dict
from qnpu.transforms.activations import activation_scales

A8_STATIC = QSpec(bits=8, granularity="tensor")
A8_ASYM = QSpec(bits=8, granularity="tensor", symmetric=False)
A8_DYNAMIC = QSpec(bits=8, granularity="token", dynamic=True)


def scales(spec, view=None):
    view = view or random_block(0)
    recipe = chain(quant_specs(activation=spec), activation_scales())
    return view, recipe.update(view, recipe.init(view))[1].states[-1]


def test_symmetric_static_scale_covers_the_calibration_absmax():
    view, state = scales(A8_STATIC)
    for name in view.structure.linears:
        scale, zp = state.qparams[name]
        assert zp is None
        assert torch.allclose(scale, view.stats[name].absmax.max() / 127)
        # every calibration token quantizes without clipping
        q = quantize(view.stats[name].tokens, A8_STATIC, scale=scale)
        assert int(q.codes.abs().max()) <= 127


def test_asymmetric_static_scale_spans_min_and_max():
    view, state = scales(A8_ASYM)
    scale, zp = state.qparams["mlp.down_proj"]
    tokens = view.stats["mlp.down_proj"].tokens
    q = quantize(tokens, A8_ASYM, scale=scale, zero_point=zp)
    assert int(q.codes.min()) == -128 and int(q.codes.max()) >= 126


def test_dynamic_specs_need_no_offline_scale():
    _, state = scales(A8_DYNAMIC)
    assert state.qparams == {}


def test_missing_statistics_name_the_layer():
    view = random_block(0)
    view = view._replace(stats={})
    with pytest.raises(TransformError, match=r"activation_scales: layer model\.layers\.0\.self_attn\.q_proj"):
        scales(A8_STATIC, view)


def test_state_round_trip():
    _, state = scales(A8_ASYM)
    again = state_from_dict(state_to_dict(state))
    for name, (s, z) in state.qparams.items():
        assert torch.equal(again.qparams[name][0], s) and torch.equal(again.qparams[name][1], z)
