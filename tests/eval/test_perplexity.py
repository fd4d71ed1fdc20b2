"""Windowed perplexity against a hand computation, and the committed slices' integrity."""
import functools
import hashlib
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

from qnpu.data import SLICES_DIR, SliceError, manifest, read_slice, slice_info, slice_names, slice_path
from qnpu.eval import perplexity, tokenize_slice


@functools.lru_cache(maxsize=None)
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def random_ids(n: int, seed: int, vocab: int = 61) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def manual_nll(model, ids: torch.Tensor, window: int) -> float:
    """Mean next-token cross-entropy over non-overlapping full windows, from the logits."""
    n_windows = ids.numel() // window
    total = 0.0
    with torch.no_grad():
        for w in range(n_windows):
            x = ids[w * window:(w + 1) * window]
            logits = model(x[None]).logits[0].double()
            total += F.cross_entropy(logits[:-1], x[1:], reduction="sum").item()
    return total / (n_windows * (window - 1))


@given(window=st.integers(2, 24), n_windows=st.integers(1, 4), tail=st.integers(0, 23),
       seed=st.integers(0, 2**16))
@example(window=16, n_windows=3, tail=5, seed=0)
def test_perplexity_equals_the_hand_computation(window, n_windows, tail, seed):
    tail = tail % window  # a trailing partial window, shorter than one window
    ids = random_ids(n_windows * window + tail, seed)
    before = ids.clone()
    out = perplexity(tiny_llama(), ids, window, progress=False)
    expected = manual_nll(tiny_llama(), ids, window)
    assert out["nll"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert out["ppl"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert out["n_windows"] == n_windows and out["window"] == window
    assert out["n_predictions"] == n_windows * (window - 1) and out["n_dropped"] == tail
    assert torch.equal(ids, before)


def test_the_trailing_partial_window_is_dropped():
    model, ids = tiny_llama(), random_ids(3 * 16, 1)
    full = perplexity(model, ids, 16, progress=False)
    longer = perplexity(model, torch.cat([ids, random_ids(15, 2)]), 16, progress=False)
    assert longer["nll"] == full["nll"] and longer["n_dropped"] == 15 and full["n_dropped"] == 0


def test_windows_do_not_share_context():
    """The windowed value differs from one long sequence's, so the test above is discriminating."""
    model, ids = tiny_llama(), random_ids(4 * 16, 3)
    windowed = perplexity(model, ids, 16, progress=False)["nll"]
    one_sequence = manual_nll(model, ids, ids.numel())
    assert abs(windowed - one_sequence) > 1e-4


class Recorder(torch.nn.Module):
    """A fake causal LM whose loss is the window's first token / 10; it records its inputs."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward(self, x, labels=None):
        self.calls.append((x.clone(), labels))
        return SimpleNamespace(loss=x[0, 0].to(torch.float32) / 10)


def test_windows_are_consecutive_and_weighted_by_their_predictions():
    model = Recorder().train()
    ids = torch.arange(5 * 8 + 3)
    out = perplexity(model, ids, 8, progress=False)
    assert len(model.calls) == 5
    for w, (x, labels) in enumerate(model.calls):
        assert labels is not None and torch.equal(labels, x)
        assert x.shape == (1, 8) and x.dtype == torch.long and torch.equal(x[0], ids[w * 8:(w + 1) * 8])
    # window losses 0, 0.8, 1.6, 2.4, 3.2, each over 7 predictions
    assert out["nll"] == pytest.approx(1.6, abs=1e-6) and out["n_predictions"] == 35
    assert model.training  # the caller's mode is restored


def test_progress_bar_goes_to_stderr_only_when_asked(capsys):
    perplexity(Recorder(), torch.arange(16), 8, progress=False)
    quiet = capsys.readouterr()
    perplexity(Recorder(), torch.arange(16), 8, progress=True)
    loud = capsys.readouterr()
    assert quiet.err == "" and quiet.out == "" and loud.out == ""
    assert "perplexity" in loud.err and "2/2" in loud.err


@pytest.mark.parametrize("ids, window, match", [
    (torch.zeros(2, 8, dtype=torch.long), 4, "1-d"),
    (torch.zeros(8), 4, "integer"),
    (torch.zeros(8, dtype=torch.long), 1, "window"),
    (torch.zeros(8, dtype=torch.long), True, "window"),
    (torch.zeros(7, dtype=torch.long), 8, "at least"),
])
def test_bad_inputs_are_rejected(ids, window, match):
    with pytest.raises(ValueError, match=match):
        perplexity(Recorder(), ids, window, progress=False)


# ---- committed slices ----------------------------------------------------------------------

PROTOCOL_TOKENS = {"calibration": 128 * 512, "docs": 40 * 512, "code": 40 * 512}


def test_the_manifest_lists_the_protocol_slices():
    assert slice_names() == sorted(PROTOCOL_TOKENS)
    for name, n in PROTOCOL_TOKENS.items():
        assert slice_info(name)["n_tokens"] == n
    assert manifest()["join"] == "\\n\\n" and manifest()["window"] == 512


@pytest.mark.parametrize("name", sorted(PROTOCOL_TOKENS))
def test_slice_files_match_the_manifest(name):
    info, data = slice_info(name), slice_path(name).read_bytes()
    assert hashlib.sha256(data).hexdigest() == info["sha256"]
    assert len(data) == info["n_bytes"]
    text = read_slice(name)
    assert len(text) == info["n_chars"] and text.endswith("\n")
    assert info["n_tokens_in_file"] >= info["n_tokens"]


def test_read_slice_detects_a_modified_copy(tmp_path):
    root = tmp_path / "slices"
    shutil.copytree(SLICES_DIR, root)
    assert read_slice("docs", root=root) == read_slice("docs")
    path = slice_path("docs", root=root)
    data = bytearray(path.read_bytes())
    data[1000] ^= 0x01  # flip one bit
    path.write_bytes(bytes(data))
    with pytest.raises(SliceError, match="corrupted or modified"):
        read_slice("docs", root=root)
    path.unlink()
    with pytest.raises(SliceError, match="missing"):
        read_slice("docs", root=root)
    with pytest.raises(SliceError, match="unknown slice"):
        read_slice("wiki", root=root)


class CharTokenizer:
    """Character-level stand-in for a Hugging Face tokenizer; its special token is id 0."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([0] if add_special_tokens else []) + [ord(c) for c in text]}


def test_tokenize_slice_returns_the_first_tokens_without_bos():
    ids = tokenize_slice(CharTokenizer(), "code", 300)
    assert ids.dtype == torch.long and ids.shape == (300,)
    assert ids.tolist() == [ord(c) for c in read_slice("code")[:300]]
    assert tokenize_slice(CharTokenizer(), "docs").numel() == 20480  # the manifest's count
    assert tokenize_slice(CharTokenizer(), "code", "all").numel() == len(read_slice("code"))
    with pytest.raises(ValueError, match="fewer than"):
        tokenize_slice(CharTokenizer(), "docs", 10**7)


def test_a_collapsed_model_has_infinite_perplexity_not_an_overflow():
    """A mean NLL above log(float max) ~ 709.78 (a broken W4A4 model) reports ppl = inf, not
    OverflowError; just below it the value is exp(nll) itself."""
    ids = torch.full((3 * 8,), 8000)  # Recorder's loss: 800 nats per window
    out = perplexity(Recorder(), ids, 8, progress=False)
    assert out["nll"] == pytest.approx(800.0) and out["ppl"] == math.inf
    below = perplexity(Recorder(), torch.full((8,), 7000), 8, progress=False)
    assert below["ppl"] == pytest.approx(math.exp(700.0), rel=1e-9)
