"""Write a folder atomically: build it under ``<path>.partial-<pid>``, then rename it into place.

With ``overwrite`` an existing folder is renamed aside first and removed only after the new one
is in place, so an interrupted export never leaves neither; a failed one leaves no folder.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


def check_output(path: str | os.PathLike, overwrite: bool) -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"output folder {path} exists; choose another or pass overwrite=True (--overwrite)")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"output path {path} is a file, not a folder; choose another")
    return path


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder; on success it becomes ``path``, on any exception it is removed."""
    path = check_output(path, overwrite)
    tmp = path.with_name(f"{path.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    aside = path.with_name(f"{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, aside)
    os.replace(tmp, path)
    shutil.rmtree(aside, ignore_errors=True)
