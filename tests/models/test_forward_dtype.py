"""``forward_dtype=torch.bfloat16`` (``qnpu quantize --forward-dtype bfloat16``): the blocks' forward
passes run under bfloat16 autocast while statistics, hidden states, the recipe and the stored weights
stay in the model's dtype, close to the float32 run's."""
from __future__ import annotations

import pytest
import torch

from qnpu.models.engine import LayerwiseCalibration, quantize_model
from qnpu.models.families import block_structure, family_for
from qnpu.transforms import recipes, rtn

from .test_device_plumbing import engine_kwargs_of
from .test_engine import calibration, tiny_llama


def _linear_dtypes(model):
    seen = []
    handles = [m.register_forward_hook(lambda mod, inp, out: seen.append((inp[0].dtype, out.dtype)))
               for n, m in model.named_modules() if n.endswith("mlp.down_proj")]
    return seen, handles


@pytest.mark.parametrize("name", ["w4a16-gptq", "w4a8", "w3a16-gptq"])
def test_bfloat16_forwards_quantize_as_well_as_float32_ones(name):
    ids = calibration()
    with torch.no_grad():
        base = tiny_llama(2)(ids).logits
    ref = quantize_model(tiny_llama(2), recipes.get(name), ids, progress=False).model
    model = tiny_llama(2)
    seen, handles = _linear_dtypes(model)
    result = quantize_model(model, recipes.get(name), ids, progress=False, forward_dtype=torch.bfloat16)
    for h in handles:
        h.remove()
    assert seen and all(out == torch.bfloat16 for _, out in seen)  # the matmuls ran in bfloat16
    down = result.model.model.layers[1].mlp.down_proj
    assert down.weight.dtype == torch.float32 and down.qweight is not None
    assert not torch.equal(down.weight, ref.model.layers[1].mlp.down_proj.weight)  # other statistics were used
    with torch.no_grad():
        out, out_ref = result.model(ids).logits, ref(ids).logits
    assert out.dtype == torch.float32
    # the model's error against the float model: as small as with float32 calibration (measured
    # within 2% on these models; the quantization error dominates bfloat16's)
    err, err_ref = ((out - base).norm() / base.norm()).item(), ((out_ref - base).norm() / base.norm()).item()
    assert err < 1.1 * err_ref, (err, err_ref)


def test_float32_forwards_are_the_default_and_other_dtypes_are_refused():
    model = tiny_llama(1)
    family, structure = family_for(model.config), block_structure(model.config)
    assert LayerwiseCalibration(rtn(), family, structure).forward_dtype is None
    with pytest.raises(ValueError, match="forward_dtype"):
        LayerwiseCalibration(rtn(), family, structure, forward_dtype=torch.float16)
    seen, handles = _linear_dtypes(model)
    quantize_model(model, recipes.get("w4a16-gptq"), calibration(), progress=False)
    assert seen and all(out == torch.float32 for _, out in seen)


def test_the_cli_option_reaches_the_engine(monkeypatch, tmp_path):
    args = ["quantize", "--no-eval", "--samples", "2", "--seq-len", "8", "--output"]
    got = engine_kwargs_of(monkeypatch, [*args, str(tmp_path / "a"), "--forward-dtype", "bfloat16"])
    assert got["forward_dtype"] is torch.bfloat16
    assert engine_kwargs_of(monkeypatch, [*args, str(tmp_path / "b")])["forward_dtype"] is None
