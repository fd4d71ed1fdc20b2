import json
import subprocess
import sys

from qnpu.cli import main


def test_help_and_version(capsys):
    assert main([]) == 0
    assert "hadamard" in capsys.readouterr().out


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["torch"].startswith("2.") and data["torch_npu_installed"] in (True, False)


def test_hadamard_reports_the_construction(capsys):
    assert main(["hadamard", "12800", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["power_of_two"] * data["core"] == 12800
    assert data["core"] == 100


def test_unsupported_hadamard_order_exits_2_with_the_reason(capsys):
    assert main(["hadamard", "6"]) == 2
    assert "n" in capsys.readouterr().err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "qnpu.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("qnpu ")


def test_quantize_rejects_an_unknown_recipe_with_suggestions(capsys):
    assert main(["quantize", "--recipe", "w4a16-gtpq", "--no-eval"]) == 2
    assert "did you mean w4a16-gptq" in capsys.readouterr().err


def test_quantize_rejects_a_missing_model_path(capsys, tmp_path):
    # an explicit --output: a ./qnpu-out left by a user's earlier run must not change the outcome
    assert main(["quantize", "--model", str(tmp_path / "nope"), "--no-eval", "--output", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_recipes_lists_every_builtin(capsys):
    from qnpu.transforms import recipes

    assert main(["recipes", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == set(recipes.names())


def test_quantize_checks_device_and_output_before_loading_anything(capsys, tmp_path):
    assert main(["quantize", "--device", "tpu", "--no-eval"]) == 2
    assert "allowed: cpu, cuda" in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    assert main(["quantize", "--output", str(tmp_path / "out"), "--no-eval"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_unreadable_weights_are_an_error_naming_the_folder(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                      "hidden_size": 8, "intermediate_size": 16,
                                                      "num_hidden_layers": 1, "num_attention_heads": 2,
                                                      "vocab_size": 16}))
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    assert main(["eval", str(tmp_path)]) == 2
    assert f"model at {tmp_path} could not be loaded" in capsys.readouterr().err


def test_out_of_memory_exits_3_with_what_to_lower(capsys, monkeypatch):
    import qnpu.jobs

    def boom(**kwargs):
        raise MemoryError("out of memory while quantizing block 3")

    monkeypatch.setattr(qnpu.jobs, "quantize_job", boom)
    assert main(["quantize", "--no-eval"]) == 3
    assert "lower --batch-size" in capsys.readouterr().err


def test_families_lists_every_table(capsys):
    assert main(["families", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"llama", "mistral", "qwen2", "qwen3", "openpangu-embedded"} <= set(data)
    assert data["qwen3"]["qk_norms"] == ["self_attn.q_norm", "self_attn.k_norm"]
    assert main(["families"]) == 0
    assert "smoothing pairs  input_layernorm -> self_attn.q_proj" in capsys.readouterr().out


def test_a_default_output_lands_in_the_test_folder_not_where_pytest_started(capsys, tmp_path_factory):
    from pathlib import Path

    assert Path.cwd().is_relative_to(tmp_path_factory.getbasetemp()) and not any(Path.cwd().iterdir())
    Path("qnpu-out").mkdir()  # what the README's main job leaves: the default --output exists
    assert main(["quantize", "--no-eval"]) == 2 and "qnpu-out exists" in capsys.readouterr().err


def test_true_sequential_flag_defaults_to_the_engine_choice():
    from qnpu.cli import build_parser

    parse = lambda *a: build_parser().parse_args(["quantize", *a]).true_sequential  # noqa: E731
    assert (parse(), parse("--true-sequential"), parse("--no-true-sequential")) == (None, True, False)
