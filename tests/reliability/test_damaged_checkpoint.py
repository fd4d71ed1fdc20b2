"""A checkpoint whose codes are out of their spec's range or whose scales are NaN is refused on load
with one line naming the shard file and the quantized linear (`qnpu eval` exits 2)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from qnpu.cli import main
from qnpu.models import Checkpoint, load_quantized, quantize_model, save_quantized
from qnpu.transforms import recipes

LABEL = "model.layers.1.mlp.up_proj"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    recipe = recipes.get("w4a16-rtn")
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    result = quantize_model(LlamaForCausalLM(config).eval(), recipe, ids, progress=False)
    return save_quantized(result, tmp_path_factory.mktemp("ckpt") / "q", source={"name": "tiny"}, recipe=recipe)


def _damaged(checkpoint, tmp_path, tensor: str, change) -> tuple:
    """A copy of ``checkpoint`` with ``change`` applied to ``tensor``; returns (folder, its shard file)."""
    import shutil

    folder = tmp_path / "damaged"
    shutil.copytree(checkpoint, folder)
    meta = Checkpoint(folder).meta
    for shard in meta["shards"]:
        tensors = load_file(str(folder / shard))
        if tensor in tensors:
            change(tensors[tensor])
            save_file(tensors, str(folder / shard))
            return folder, folder / shard
    raise AssertionError(f"{tensor} is in no shard")


def _codes_out_of_range(codes):
    codes[0, 0] = 100  # a 4-bit code is in [-8, 7]


def _nan_scale(scale):
    scale[0, 0] = float("nan")


@pytest.mark.parametrize("tensor, change, problem", [
    (f"{LABEL}.codes", _codes_out_of_range, "codes span"),
    (f"{LABEL}.scale", _nan_scale, "scale has NaN/Inf"),
])
def test_loading_names_the_file_and_the_linear(checkpoint, tmp_path, capsys, tensor, change, problem):
    assert load_quantized(checkpoint) is not None  # the undamaged checkpoint loads
    folder, shard = _damaged(checkpoint, tmp_path, tensor, change)
    with pytest.raises(ValueError, match=problem) as info:
        load_quantized(folder)
    message = str(info.value)
    assert str(shard) in message and LABEL in message and "\n" not in message
    assert main(["eval", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qnpu eval: error:") and str(shard) in err[0] and LABEL in err[0]


def test_a_missing_codes_tensor_is_named(checkpoint, tmp_path, capsys):
    folder, shard = _damaged(checkpoint, tmp_path, f"{LABEL}.scale", lambda t: None)
    tensors = load_file(str(shard))
    del tensors[f"{LABEL}.codes"]
    save_file(tensors, str(shard))
    with pytest.raises(ValueError, match=rf"{LABEL}.*lacks {LABEL}\.codes"):
        load_quantized(folder)
    assert main(["eval", str(folder)]) == 2
    assert f"lacks {LABEL}.codes" in capsys.readouterr().err
