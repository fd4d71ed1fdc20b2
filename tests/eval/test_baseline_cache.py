"""The baseline-perplexity cache: a second run reads it, anything the number depends on invalidates it,
a damaged entry is measured again with a warning, and the folder comes from $QNPU_BASELINE_CACHE."""
from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import qnpu.eval.baseline_cache as bc
from qnpu.eval.baseline_cache import cache_dir, cached_baseline, model_identity


class WordTokenizer:
    """Whitespace words hashed to ids below 128 (``shift`` changes every id: another tokenizer)."""

    def __init__(self, shift: int = 0):
        self.shift = shift

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [(sum(map(ord, w)) + self.shift) % 128 for w in text.split()]}


def _tiny(path, seed: int = 0):
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=128, max_position_embeddings=512)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    return model


@pytest.fixture
def counted(monkeypatch):
    """Calls of the perplexity evaluator, by number of tokens scored."""
    calls: list[int] = []
    real = bc.timed_perplexity

    def counting(model, ids, **kwargs):
        calls.append(int(ids.numel()))
        return real(model, ids, **kwargs)

    monkeypatch.setattr(bc, "timed_perplexity", counting)
    return calls


def _run(model, identity, tokenizer=None, n_tokens=512, slices=("docs",), **kwargs):
    return cached_baseline(model, tokenizer or WordTokenizer(), identity, slices, n_tokens, progress=False, **kwargs)


def test_the_second_run_reads_the_cache(tmp_path, counted):
    model = _tiny(tmp_path / "m")
    first, info = _run(model, model_identity(tmp_path / "m"), slices=("docs", "code"))
    assert counted == [512, 512] and not any(e["hit"] for e in info["entries"].values())
    second, info = _run(model, model_identity(tmp_path / "m"), slices=("docs", "code"))
    assert counted == [512, 512], "the baseline was measured again"
    assert second == first and all(e["hit"] for e in info["entries"].values())
    assert info["entries"]["docs"]["key"] != info["entries"]["code"]["key"]


def test_cache_folder_comes_from_the_environment(tmp_path, monkeypatch, counted):
    monkeypatch.setenv("QNPU_BASELINE_CACHE", str(tmp_path / "here"))
    assert cache_dir() == tmp_path / "here"
    model = _tiny(tmp_path / "m")
    _, info = _run(model, model_identity(tmp_path / "m"))
    assert info["dir"] == str(tmp_path / "here")
    assert [p.name for p in (tmp_path / "here").iterdir()] == [info["entries"]["docs"]["key"] + ".json"]
    monkeypatch.delenv("QNPU_BASELINE_CACHE")
    monkeypatch.setenv("QNPU_CACHE", str(tmp_path / "qnpu-cache"))
    assert cache_dir() == tmp_path / "qnpu-cache" / "baseline-ppl"


@pytest.mark.parametrize("change", ["eval_tokens", "slice_text", "tokenizer", "weights", "config", "threads"])
def test_what_the_baseline_depends_on_invalidates_it(tmp_path, counted, monkeypatch, change):
    model = _tiny(tmp_path / "m")
    _run(model, model_identity(tmp_path / "m"))
    assert counted == [512]
    kwargs = {}
    if change == "eval_tokens":
        kwargs["n_tokens"] = 1024
    elif change == "slice_text":  # the manifest's sha256 of the slice changed (the slice was rebuilt)
        real = bc.slice_info
        monkeypatch.setattr(bc, "slice_info", lambda name: {**real(name), "sha256": "0" * 64})
    elif change == "tokenizer":
        kwargs["tokenizer"] = WordTokenizer(shift=1)
    elif change == "weights":  # same size, another modification time
        model = _tiny(tmp_path / "m", seed=1)
        st = os.stat(tmp_path / "m" / "model.safetensors")
        os.utime(tmp_path / "m" / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    elif change == "config":
        cfg = tmp_path / "m" / "config.json"
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "rms_norm_eps": 1e-5}))
    elif change == "threads":
        monkeypatch.setattr(torch, "get_num_threads", lambda: 97)
    _, info = _run(model, model_identity(tmp_path / "m"), **kwargs)
    assert len(counted) == 2 and not info["entries"]["docs"]["hit"], f"a changed {change} read the old baseline"


def test_a_damaged_entry_is_measured_again_with_a_warning(tmp_path, counted, capsys):
    model = _tiny(tmp_path / "m")
    first, info = _run(model, model_identity(tmp_path / "m"))
    entry = cache_dir() / (info["entries"]["docs"]["key"] + ".json")
    good = entry.read_text()
    for damage in (good[: len(good) // 2], "", json.dumps({**json.loads(good), "result": {"ppl": "12"}}),
                   json.dumps({**json.loads(good), "key": "0" * 64}), b"\xff\xfe"):
        entry.write_bytes(damage if isinstance(damage, bytes) else damage.encode())
        capsys.readouterr()
        again, info = _run(model, model_identity(tmp_path / "m"))
        err = capsys.readouterr().err
        assert "damaged" in err and str(entry) in err and not info["entries"]["docs"]["hit"]
        assert again["docs"]["ppl"] == first["docs"]["ppl"]
        assert json.loads(entry.read_text())["result"]["ppl"] == first["docs"]["ppl"]  # rewritten whole
    assert len(counted) == 6


def test_no_cache_measures_and_stores_nothing(tmp_path, counted):
    model = _tiny(tmp_path / "m")
    _run(model, model_identity(tmp_path / "m"))
    _, info = _run(model, model_identity(tmp_path / "m"), use_cache=False)
    assert len(counted) == 2 and not info["used"] and not info["entries"]["docs"]["hit"]
    entries = list(cache_dir().iterdir())
    _run(model, model_identity(tmp_path / "m"), slices=("code",), use_cache=False)
    assert list(cache_dir().iterdir()) == entries and len(counted) == 3


def test_an_unwritable_cache_is_a_warning(tmp_path, monkeypatch, counted, capsys):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("QNPU_BASELINE_CACHE", str(tmp_path / "file" / "cache"))
    model = _tiny(tmp_path / "m")
    result, _ = _run(model, model_identity(tmp_path / "m"))
    assert result["docs"]["ppl"] > 1 and "could not be written" in capsys.readouterr().err
