"""Write a folder atomically: build it under ``<path>.partial-<pid>``, then rename it into place.

With ``overwrite`` an existing folder (or file) is renamed aside to ``<path>.old-<pid>`` first and
removed only after the new one is in place; an interruption between the renames puts it back, so
an export never leaves neither; a failed one leaves no folder. What killed runs left beside
``path`` is cleaned first (`qnpu.qcore.outputs`).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from qnpu.qcore.outputs import publish, recover, remove, staging


def check_output(path: str | os.PathLike, overwrite: bool) -> Path:
    """``path`` as a Path, after putting back an output a killed run left aside (`recover`); refuses
    an existing one without ``overwrite``."""
    path = Path(path)
    recover(path)
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"output folder {path} exists; choose another or pass overwrite=True (--overwrite)")
    return path


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder; on success it becomes ``path``, on any exception it is removed."""
    path = check_output(path, overwrite)
    tmp = staging(path)
    try:
        yield tmp
        publish(tmp, path)
    finally:
        remove(tmp)  # (gone already once published)
