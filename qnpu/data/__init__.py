"""The committed text slices of the shared accuracy protocol (docs/architecture.md,
"Default model and accuracy protocol").

``qnpu/data/slices/`` holds three UTF-8 text files cut from the Python 3.11 documentation sources
and the CPython 3.11 standard library (PSF license, see ``slices/README.md``), rebuilt by
``scripts/build_data_slices.py``, and ``MANIFEST.json`` recording each one's source, character
count, protocol token count and sha256:

- ``calibration``: ``library/*.rst.txt``, its first 65,536 tokens are 128 chunks of 512;
- ``docs``: ``tutorial/``, ``faq/``, ``howto/``, first 20,480 tokens (40 windows of 512);
- ``code``: stdlib ``*.py`` with ``md5(basename) % 5 == 0``, first 20,480 tokens.

Each slice is the shortest line-aligned prefix of the joined source text whose tokenization starts
with exactly the protocol's tokens, so ``tokenizer(slice)[:n_tokens]`` equals the first
``n_tokens`` of the full text's tokens (the build script checks this).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

SLICES_DIR = Path(__file__).resolve().parent / "slices"
MANIFEST_FILE = "MANIFEST.json"


class SliceError(ValueError):
    """A slice is unknown, missing, or its bytes do not match the sha256 in the manifest."""


def manifest(root: str | Path | None = None) -> dict:
    """The parsed ``MANIFEST.json`` of ``root`` (default: the packaged slices folder)."""
    path = Path(root or SLICES_DIR) / MANIFEST_FILE
    if not path.is_file():
        raise SliceError(f"no slice manifest at {path}; rebuild it with scripts/build_data_slices.py")
    return json.loads(path.read_text(encoding="utf-8"))


def slice_names(root: str | Path | None = None) -> list[str]:
    """Names of the slices listed in the manifest, e.g. ``['calibration', 'code', 'docs']``."""
    return sorted(manifest(root)["slices"])


def slice_info(name: str, root: str | Path | None = None) -> dict:
    """The manifest entry of slice ``name`` (file, source, n_tokens, n_chars, sha256, ...)."""
    slices = manifest(root)["slices"]
    if name not in slices:
        raise SliceError(f"unknown slice {name!r}; the manifest lists {sorted(slices)}")
    return slices[name]


def slice_path(name: str, root: str | Path | None = None) -> Path:
    """Path of the text file of slice ``name`` (``'calibration'``, ``'docs'`` or ``'code'``)."""
    return Path(root or SLICES_DIR) / slice_info(name, root)["file"]


def read_slice(name: str, root: str | Path | None = None) -> str:
    """The text of slice ``name``, after checking its bytes against the manifest's sha256.

    The file is read as bytes and decoded as UTF-8 without newline translation, so the text is
    exactly what was hashed and tokenized when the slice was built.
    """
    info = slice_info(name, root)
    path = slice_path(name, root)
    if not path.is_file():
        raise SliceError(f"slice {name!r} is missing: {path}; rebuild it with scripts/build_data_slices.py")
    data = path.read_bytes()
    found = hashlib.sha256(data).hexdigest()
    if found != info["sha256"]:
        raise SliceError(
            f"slice {name!r} at {path} is corrupted or modified: sha256 {found} != manifest "
            f"{info['sha256']}; restore the file from the qnpu repository or package, or rebuild "
            "all slices with scripts/build_data_slices.py")
    return data.decode("utf-8")
