"""Output folders written in one piece: the renames shared by checkpoints (`models.checkpoint`),
exports (`lowering.folders`) and the default model's cache (`models.default`).

A writer builds its folder as ``<out>.partial-<pid>`` (`staging`), then `publish` moves it into
place: an existing output is renamed to ``<out>.old-<pid>``, the new folder to ``<out>``, and only
then is the old one deleted. Interrupted between the two renames (an exception, KeyboardInterrupt),
`publish` puts the old output back before it returns, so ``<out>`` is the old output or the new
one, never neither. A process killed outright (SIGKILL, power loss) leaves its ``.partial-<pid>``
and maybe ``.old-<pid>``: `recover`, run before the next write to the same output, deletes the
entries of processes that are gone and first renames an orphaned ``.old-<pid>`` back to ``<out>``
when ``<out>`` is missing. Only names of exactly that form next to the output are touched, and
never those of a live process (``os.kill(pid, 0)``; on other systems than POSIX nothing is cleaned).

Filesystem plumbing, not numerics: it sits in qcore only because it is the layer both `models` and
`lowering` may import.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from pathlib import Path

KINDS = ("partial", "old")


def sibling(path: str | os.PathLike, kind: str, pid: int | None = None) -> Path:
    """``<path>.<kind>-<pid>`` (this process by default), next to ``path``."""
    path = Path(path)
    return path.with_name(f"{path.name}.{kind}-{os.getpid() if pid is None else pid}")


def remove(path: str | os.PathLike) -> None:
    """Delete ``path`` whatever it is (folder, file, symlink), ignoring what cannot be deleted."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def staging(path: str | os.PathLike) -> Path:
    """A fresh, empty ``<path>.partial-<pid>`` folder (parents created) to build ``path`` in (call
    `recover` first)."""
    tmp = sibling(path, "partial")
    remove(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Rename the finished folder ``tmp`` to ``path``, replacing what is there (folder or file).

    The old entry goes to ``<path>.old-<pid>`` first and is deleted once the new one is in place.
    Whatever interrupts this (an OSError of the second rename, KeyboardInterrupt at any point), the
    ``finally`` puts the old entry back if ``path`` is missing, else deletes it: ``path`` ends as
    the old output or the new one, never neither. The state is read from the filesystem, not from
    variables, since a signal can arrive between a rename and the next statement."""
    tmp, path = Path(tmp), Path(path)
    old = sibling(path, "old")
    remove(old)
    try:
        if os.path.lexists(path):
            with contextlib.suppress(FileNotFoundError):  # (another process moved it meanwhile)
                os.replace(path, old)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(old):
            if os.path.lexists(path):
                remove(old)
            else:
                os.replace(old, path)
    return path


def alive(pid: int) -> bool:
    """Whether process ``pid`` may still exist (unknown counts as alive: its files are not touched)."""
    if os.name != "posix" or pid <= 0:
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except OSError as err:
        return err.errno != errno.ESRCH
    except (OverflowError, ValueError):
        return True
    return True


def recover(path: str | os.PathLike) -> list[str]:
    """Clean what interrupted writes of dead processes left beside ``path``: put back the newest
    orphaned ``<path>.old-<pid>`` when ``path`` is missing, then delete the other ``.old-<pid>`` and
    every ``.partial-<pid>``. Returns one line per action, for the caller to show."""
    path = Path(path)
    if not path.name:
        return []
    pattern = re.compile(re.escape(path.name) + r"\.(partial|old)-([0-9]+)")
    stale: dict[str, list[Path]] = {kind: [] for kind in KINDS}
    try:
        with os.scandir(path.parent) as entries:
            for entry in entries:
                match = pattern.fullmatch(entry.name)
                if match and not alive(int(match[2])):
                    stale[match[1]].append(path.with_name(entry.name))
    except OSError:  # no parent folder yet, or unreadable: nothing to clean
        return []
    done = []
    if stale["old"] and not os.path.lexists(path):
        newest = max(stale["old"], key=lambda p: p.lstat().st_mtime_ns)
        try:
            os.replace(newest, path)
        except OSError:
            pass
        else:
            stale["old"].remove(newest)
            done.append(f"put back {path} from {newest.name}, left by an interrupted run (process "
                        f"{newest.name.rsplit('-', 1)[1]} is gone)")
    for leftover in stale["partial"] + stale["old"]:
        remove(leftover)
        done.append(f"removed {leftover}, left by an interrupted run (process {leftover.name.rsplit('-', 1)[1]} "
                    "is gone)")
    return done
