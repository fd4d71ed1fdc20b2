"""`qnpu eval --text FILE` / `--text-dir DIR`: the slices' windowing protocol on a user's text."""
import json
import math

import pytest
import torch

from qnpu.eval import perplexity
from qnpu.eval.text import TextError, read_texts, text_files, text_perplexity
from qnpu.models.default import default_model_available
from tests.eval.fakes import CharTokenizer, run_cli, tiny_llama



def test_files_are_windowed_apart_and_weighted_by_predictions(tmp_path):
    model, tok = tiny_llama(), CharTokenizer()
    texts = [(tmp_path / "a.txt", "abcdefgh" * 40), (tmp_path / "b.txt", "the quick brown fox " * 30),
             (tmp_path / "c.txt", "short")]
    result = text_perplexity(model, tok, texts, window=64, progress=False)
    parts = [perplexity(model, torch.tensor(tok(t)["input_ids"]), 64, progress=False) for _, t in texts[:2]]
    nll = sum(p["nll"] * p["n_predictions"] for p in parts) / sum(p["n_predictions"] for p in parts)
    assert result["nll"] == pytest.approx(nll, rel=1e-12) and result["ppl"] == pytest.approx(math.exp(nll))
    assert result["n_files"] == 2 and result["n_windows"] == sum(p["n_windows"] for p in parts)
    assert result["skipped"] == [{"path": str(tmp_path / "c.txt"), "reason": "5 tokens, fewer than one window of 64"}]
    capped = text_perplexity(model, tok, texts[:1], window=64, max_tokens=128, progress=False)
    assert capped["n_windows"] == 2
    with pytest.raises(TextError, match="no text has a full window"):
        text_perplexity(model, tok, texts[2:], window=64, progress=False)


def test_folders_files_and_encodings(tmp_path):
    (tmp_path / "sub").mkdir(), (tmp_path / ".git").mkdir()
    for name in ("b.txt", "sub/a.txt", ".git/x.txt", "notes.md"):
        (tmp_path / name).write_text("text")
    assert text_files(text_dir=tmp_path) == [tmp_path / "b.txt", tmp_path / "sub" / "a.txt"]
    (tmp_path / "bad.txt").write_bytes(b"ok\xff")
    with pytest.raises(TextError, match=r"bad.txt is not UTF-8 \(byte 0xff at offset 2\).*--skip-bad"):
        read_texts(text_files(text_dir=tmp_path))
    texts, skipped = read_texts(text_files(text_dir=tmp_path), skip_bad=True)
    assert len(texts) == 2 and skipped[0]["path"].endswith("bad.txt")
    for kwargs, message in (({"text": tmp_path / "nope.txt"}, "does not exist"), ({"text": tmp_path}, "--text-dir"),
                            ({"text_dir": tmp_path / "b.txt"}, "is not a folder"), ({}, "give one of"),
                            ({"text_dir": tmp_path / "sub" / "none"}, "does not exist")):
        with pytest.raises(TextError, match=message):
            text_files(**kwargs)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TextError, match="holds no"):
        text_files(text_dir=tmp_path / "empty")


@pytest.mark.parametrize("argv, message", [
    (["--text", "/nonexistent/corpus.txt"], "does not exist"),
    (["--text", "x.txt", "--task", "humaneval"], "run them apart from --task"),
    (["--text", "x.txt", "--cot", "no_think"], "--cot applies to code benchmarks"),
])
def test_bad_text_options_exit_2_before_loading(argv, message):
    code, _, err = run_cli(["eval", *argv])
    assert code == 2 and message in err


@pytest.mark.skipif(not default_model_available(), reason="default model not installed")
def test_a_slice_given_as_text_has_the_slice_perplexity(tmp_path):
    from qnpu.data import read_slice

    (tmp_path / "docs.txt").write_text(read_slice("docs"), encoding="utf-8")
    code, out, err = run_cli(["eval", "--text", str(tmp_path / "docs.txt"), "--slices", "docs",
                              "--eval-tokens", "1024", "--json"])
    assert code == 0, err
    data = json.loads(out)
    assert data["text"]["n_windows"] == 2 and data["text"]["ppl"] == pytest.approx(data["perplexity"]["docs"]["ppl"],
                                                                                   rel=1e-9)
