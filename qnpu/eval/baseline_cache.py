"""A cache of the float model's perplexity, so repeated `qnpu quantize` runs evaluate only the quantized model.

One entry per (model identity, slice, evaluation tokens, window, dtype, device, library versions,
threads), each a JSON file ``<key>.json`` under `cache_dir` (``$QNPU_BASELINE_CACHE``, else
``baseline-ppl`` beside the default model's cache: ``$QNPU_CACHE/baseline-ppl`` or
``~/.cache/qnpu/baseline-ppl``). The key is the sha256 of the canonical JSON of `entry_fields`:

* the model: `model_identity` (config and tokenizer files by content, weight files by name, size and
  modification time; for the default model also the GGUF's sha256);
* the slice: its name, the manifest's sha256 of its text, the ``--eval-tokens`` asked for and the
  sha256 of the token ids actually scored (which also covers the tokenizer);
* how it is scored: window, the model's dtype and device, torch / transformers / qnpu versions and
  torch's thread count (CPU reductions may split differently with another count).

An entry is written atomically (a temporary file renamed into place); one that cannot be read, or
whose contents do not match its key, is reported as damaged and measured again.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
from pathlib import Path

import torch

import qnpu
from qnpu.data import slice_info
from qnpu.eval.perplexity import WINDOW, timed_perplexity, tokenize_slice
from qnpu.models.default import _sha256 as _sha256_file
from qnpu.models.default import default_cache_dir
from qnpu.models.loading import DEFAULT_NAMES

CACHE_ENV = "QNPU_BASELINE_CACHE"
FORMAT = 1
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
HASHED_LIMIT = 64 << 20  # larger non-weight files are identified by name, size and mtime too


def cache_dir() -> Path:
    """``$QNPU_BASELINE_CACHE`` when set, else ``baseline-ppl`` in qnpu's cache folder."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else default_cache_dir("baseline-ppl")


def _stat(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def folder_identity(folder: Path) -> dict:
    """Every regular file directly in ``folder``: weight files (and files over 64 MiB) by size and
    modification time, the others (config, tokenizer) by sha256 of their bytes."""
    files = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        if path.suffix in WEIGHT_SUFFIXES or path.stat().st_size > HASHED_LIMIT:
            files[path.name] = _stat(path)
        else:
            files[path.name] = {"sha256": _sha256_file(path)}
    return files


def model_identity(model: str | os.PathLike | None) -> dict:
    """What identifies the float model ``model`` (a `qnpu.models.load` argument) for the cache."""
    if model in DEFAULT_NAMES:
        folder = default_cache_dir()
        return {"kind": "default", "files": folder_identity(folder)}
    path = Path(model).resolve()
    if path.is_file():
        return {"kind": "file", "path": str(path), "file": _stat(path)}
    return {"kind": "folder", "path": str(path), "files": folder_identity(path)}


def entry_fields(identity: dict, slice_name: str, n_tokens: int | None, ids: torch.Tensor, net) -> dict:
    """Everything the baseline perplexity of ``slice_name`` depends on (see the module docstring)."""
    import transformers

    first = next(iter(net.parameters()), None)
    return {"format": FORMAT, "model": identity, "slice": slice_name,
            "slice_sha256": slice_info(slice_name)["sha256"], "eval_tokens": n_tokens,
            "tokens_sha256": hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest(),
            "n_tokens": int(ids.numel()), "window": WINDOW,
            "dtype": str(first.dtype if first is not None else torch.float32).removeprefix("torch."),
            "device": str(first.device if first is not None else "cpu"), "torch": torch.__version__,
            "transformers": transformers.__version__, "qnpu": qnpu.__version__, "threads": torch.get_num_threads()}


def entry_key(fields: dict) -> str:
    """sha256 of the canonical JSON of ``fields``."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _warn(message: str) -> None:
    print(f"qnpu: warning: {message}", file=sys.stderr)


def read_entry(path: Path, key: str, fields: dict) -> dict | None:
    """The cached result at ``path`` (``{"ppl", "tokens", "seconds"}``), None when there is none;
    a damaged entry (unreadable, not this key's, or not a finite positive perplexity) is reported
    on stderr and treated as absent."""
    if not path.exists():
        return None
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        result = entry["result"]
        ok = (entry["key"] == key and entry["fields"] == fields and isinstance(result["ppl"], float)
              and math.isfinite(result["ppl"]) and result["ppl"] > 0 and isinstance(result["tokens"], int))
        reason = "its contents do not match its key"
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        ok, reason = False, f"{type(err).__name__}: {err}"
    if not ok:
        _warn(f"baseline cache entry {path} is damaged ({reason}); measuring the baseline again")
        return None
    return {"ppl": result["ppl"], "tokens": result["tokens"], "seconds": result.get("seconds")}


def write_entry(path: Path, key: str, fields: dict, result: dict) -> None:
    """Write one entry atomically; a cache that cannot be written is a warning, not a failure."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"key": key, "fields": fields, "result": result}, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        _warn(f"baseline cache entry {path} could not be written ({err.strerror or err}); the next run "
              "measures the baseline again")


def cached_baseline(net, tokenizer, identity: dict, slices, n_tokens: int | None = None, *, use_cache: bool = True,
                    progress: bool = True) -> tuple[dict, dict]:
    """``(perplexities, cache_info)``: per slice ``{"ppl", "tokens", "seconds"}`` as `qnpu.jobs.evaluate`
    gives, read from the cache where an entry matches, else measured (and stored unless not
    ``use_cache``); ``cache_info`` is ``{"dir", "used", "entries": {slice: {"key", "hit"}}}``."""
    folder = cache_dir()
    out, entries = {}, {}
    for name in slices:
        ids = tokenize_slice(tokenizer, name, n_tokens)
        fields = entry_fields(identity, name, n_tokens, ids, net)
        key = entry_key(fields)
        path = folder / f"{key}.json"
        cached = read_entry(path, key, fields) if use_cache else None
        if cached is None:
            cached = timed_perplexity(net, ids, progress=progress)
            if use_cache and math.isfinite(cached["ppl"]):
                write_entry(path, key, fields, cached)
            entries[name] = {"key": key, "hit": False}
        else:
            entries[name] = {"key": key, "hit": True}
        out[name] = cached
    return out, {"dir": str(folder), "used": use_cache, "entries": entries}
