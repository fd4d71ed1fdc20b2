"""BiLLM and SliM-LLM through the engine and the checkpoint: their packed weights go through the
same channel as every rounder's (`WeightsState`), are saved as packed codes, and reload bit-exact."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from qnpu.models import load_quantized, save_quantized
from qnpu.models.checkpoint import Checkpoint
from qnpu.models.engine import quantize_model
from qnpu.models.qlinear import QLinear
from qnpu.qcore import BiLLMTensor, MixedTensor
from qnpu.transforms import recipes
from tests.models.test_families import configs, ids, tiny_model

KINDS = {"billm": BiLLMTensor, "slim-llm": MixedTensor}


def stored_bytes(path, label: str) -> int:
    """Bytes of the tensors a checkpoint keeps for linear ``label`` (read from the shards)."""
    total = 0
    for shard in json.loads((path / "qnpu.json").read_text())["shards"]:
        for name, t in load_file(str(path / shard)).items():
            if name.rsplit(".", 1)[0] == label:
                total += t.numel() * t.element_size()
    return total


@pytest.fixture(scope="module", params=list(KINDS))
def run(request):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. "weight specs but no rounder quantized them"
        model = tiny_model(configs()["llama"])
        result = quantize_model(model, recipes.get(request.param, group_size=32), ids(), progress=False)
    return request.param, result


def test_the_engine_sees_the_rounder_through_the_weights_channel(run):
    recipe, result = run
    block = result.blocks[0]
    linears = set(block.specs)
    assert set(block.qweights) == linears
    for name, q in block.qweights.items():
        assert isinstance(q, KINDS[recipe])
        module = result.model.get_submodule(f"{block.prefix}{name}")
        assert isinstance(module, QLinear) and module.qweight is q
        assert torch.equal(module.weight, q.dequantize())
        # the error is measured against the float weight the rounder received, not its own output
        assert block.linear_errors[name] > 1e-3


def test_save_load_is_bit_exact_and_stores_packed_codes(run, tmp_path):
    recipe, result = run
    path = save_quantized(result, tmp_path / recipe, source={"name": "tiny"}, recipe=recipes.get(recipe, group_size=32))
    meta = json.loads((path / "qnpu.json").read_text())
    assert meta["format_version"] == 2
    back = load_quantized(path)
    x = ids(2, 8)
    with torch.no_grad():
        assert torch.equal(back(x).logits, result.model(x).logits)
    for block in result.blocks:
        for name, q in block.qweights.items():
            label = block.prefix + name
            assert meta["linears"][label]["weight_layout"]["kind"] == q.layout
            loaded = back.get_submodule(label)
            assert type(loaded.qweight) is type(q)
            assert torch.equal(loaded.qweight.dequantize(), q.dequantize())
            assert torch.equal(loaded.weight, result.model.get_submodule(label).weight)
            assert stored_bytes(path, label) == q.packed_nbytes
            assert q.packed_nbytes < q.dequantize().numel() * 4 / 3  # far below float32


def test_a_damaged_packed_tensor_is_refused_naming_the_linear(run, tmp_path):
    recipe, result = run
    path = save_quantized(result, tmp_path / recipe, source={"name": "tiny"}, recipe=recipes.get(recipe, group_size=32))
    shard = path / json.loads((path / "qnpu.json").read_text())["shards"][0]
    tensors = load_file(str(shard))
    label = result.blocks[0].prefix + "self_attn.q_proj"
    key = f"{label}.sign" if recipe == "billm" else f"{label}.codes"
    tensors[key] = tensors[key][:-1]   # one byte short
    save_file(tensors, str(shard))
    with pytest.raises(ValueError, match=rf"{shard}: quantized linear {label} \(\w+ layout\): .*bytes.*damaged"):
        Checkpoint(path).qlinears()
