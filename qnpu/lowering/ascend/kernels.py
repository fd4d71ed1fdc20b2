"""Build and load qnpu's CATLASS kernels (``csrc/``): an explicit, opt-in step on an Ascend host.

`build` configures and compiles ``csrc/CMakeLists.txt`` with CMake, given CANN
(``ASCEND_HOME_PATH``) and a CATLASS checkout (``CATLASS_DIR``); it checks every prerequisite
first and names the missing one (`KernelBuildError`). `load` registers the resulting library's
``PrivateUse1`` kernels for the ``qnpu`` op schemas (``torch.ops.load_library``); the Ascend target
then leaves those ops to it (docs/architecture.md, "CATLASS kernels"). Nothing here runs at
import, and nothing needs CANN unless `build` or `load` is called.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

CSRC = Path(__file__).parent / "csrc"
LIBRARY_NAME = "libqnpu_catlass.so"
ENV_LIBRARY = "QNPU_CATLASS_LIB"


class KernelBuildError(RuntimeError):
    """A missing prerequisite or a failed step of the kernel build, named."""


def default_build_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qnpu" / "catlass-build"


def library_path(build_dir: Path | None = None) -> Path:
    """Where `load` looks: ``$QNPU_CATLASS_LIB``, else the library in the build folder."""
    env = os.environ.get(ENV_LIBRARY)
    return Path(env) if env else (build_dir or default_build_dir()) / LIBRARY_NAME


def check_prerequisites(catlass_dir: str | None, ascend_home: str | None) -> tuple[Path, Path]:
    """``(ascend_home, catlass_dir)`` after checking CANN, CATLASS, cmake and torch_npu."""
    home = ascend_home or os.environ.get("ASCEND_HOME_PATH")
    if not home:
        raise KernelBuildError("ASCEND_HOME_PATH is not set: install CANN >= 8.5 and source its set_env.sh "
                               "(or pass --ascend-home)")
    if not Path(home, "include").is_dir():
        raise KernelBuildError(f"ASCEND_HOME_PATH={home} has no include/ folder: not a CANN installation")
    cat = catlass_dir or os.environ.get("CATLASS_DIR")
    if not cat:
        raise KernelBuildError("CATLASS_DIR is not set: clone CATLASS and pass --catlass-dir (or set CATLASS_DIR)")
    if not Path(cat, "include", "catlass", "catlass.hpp").is_file():
        raise KernelBuildError(f"CATLASS_DIR={cat} has no include/catlass/catlass.hpp: not a CATLASS checkout")
    if shutil.which("cmake") is None:
        raise KernelBuildError("cmake is not on PATH (cmake >= 3.16 is needed)")
    if importlib.util.find_spec("torch_npu") is None:
        raise KernelBuildError("torch_npu is not installed in this Python; install the wheel matching torch "
                               f"{torch.__version__.split('+')[0]}")
    return Path(home), Path(cat)


def cmake_commands(catlass_dir: Path, ascend_home: Path, build_dir: Path, jobs: int) -> list[list[str]]:
    """The configure and build commands `build` runs."""
    return [["cmake", "-S", str(CSRC), "-B", str(build_dir), f"-DCATLASS_DIR={catlass_dir}",
             f"-DPython3_EXECUTABLE={sys.executable}", "-DCMAKE_BUILD_TYPE=Release",
             f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={build_dir}"],
            ["cmake", "--build", str(build_dir), "-j", str(jobs)]]


def build(catlass_dir: str | None = None, ascend_home: str | None = None, build_dir: str | None = None,
          jobs: int = 4) -> Path:
    """Compile the kernels; returns the library path. Raises `KernelBuildError` naming what failed."""
    home, cat = check_prerequisites(catlass_dir, ascend_home)
    out = Path(build_dir) if build_dir else default_build_dir()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "ASCEND_HOME_PATH": str(home)}
    for cmd in cmake_commands(cat, home, out, jobs):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise KernelBuildError(f"`{' '.join(cmd[:2])}` failed (exit {done.returncode}): {tail[0]}; "
                                   f"full log: rerun it in {out}")
    lib = out / LIBRARY_NAME
    if not lib.is_file():
        raise KernelBuildError(f"the build finished but {lib} is missing")
    return lib


_LOADED: list[Path] = []


def load(path: str | Path | None = None) -> bool:
    """Load the kernel library if it exists (True), else leave the ops to torch_npu (False)."""
    lib = Path(path) if path else library_path()
    if _LOADED:
        return True
    if not lib.is_file():
        return False
    torch.ops.load_library(str(lib))
    _LOADED.append(lib)
    return True


def has_kernel(op: str, dispatch_key: str = "PrivateUse1") -> bool:
    """Whether ``qnpu::op`` already has a kernel for ``dispatch_key`` (e.g. from this library)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"qnpu::{op}", dispatch_key)
