"""The opt-in CATLASS kernel build and its registration (docs/architecture.md, "CATLASS kernels").

Nothing here has CANN: the tests cover the prerequisite checks (each names what is missing), the
CLI's one-line refusal, the CMake commands, that the C++ registers implementations only for qnpu's
own schemas, and that the Ascend target leaves an op to an already-loaded kernel library.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from qnpu.cli import main
from qnpu.lowering.ascend import kernels
from qnpu.lowering.library import SCHEMAS
from qnpu.lowering.ops_w4a8 import GROUP_STEP

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def clean_env(monkeypatch):
    for var in ("ASCEND_HOME_PATH", "CATLASS_DIR", kernels.ENV_LIBRARY):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def _fake_cann(tmp_path):
    (tmp_path / "cann" / "include").mkdir(parents=True)
    return str(tmp_path / "cann")


def _fake_catlass(tmp_path):
    d = tmp_path / "catlass" / "include" / "catlass"
    d.mkdir(parents=True)
    (d / "catlass.hpp").write_text("// header\n")
    return str(tmp_path / "catlass")


def test_prerequisites_are_checked_in_order_and_named(clean_env, tmp_path):
    with pytest.raises(kernels.KernelBuildError, match="ASCEND_HOME_PATH is not set"):
        kernels.check_prerequisites(None, None)
    with pytest.raises(kernels.KernelBuildError, match="not a CANN installation"):
        kernels.check_prerequisites(None, str(tmp_path))
    home = _fake_cann(tmp_path)
    with pytest.raises(kernels.KernelBuildError, match="CATLASS_DIR is not set"):
        kernels.check_prerequisites(None, home)
    with pytest.raises(kernels.KernelBuildError, match="not a CATLASS checkout"):
        kernels.check_prerequisites(str(tmp_path), home)
    cat = _fake_catlass(tmp_path)
    clean_env.setattr(kernels.shutil, "which", lambda name: None)
    with pytest.raises(kernels.KernelBuildError, match="cmake is not on PATH"):
        kernels.check_prerequisites(cat, home)
    clean_env.setattr(kernels.shutil, "which", lambda name: "/usr/bin/cmake")
    clean_env.setattr(kernels.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(kernels.KernelBuildError, match="torch_npu is not installed"):
        kernels.check_prerequisites(cat, home)
    clean_env.setenv("ASCEND_HOME_PATH", home)
    clean_env.setenv("CATLASS_DIR", cat)
    clean_env.setattr(kernels.importlib.util, "find_spec", lambda name: object())
    assert kernels.check_prerequisites(None, None) == (Path(home), Path(cat))


def test_build_kernels_cli_refuses_in_one_line_without_cann(clean_env, capsys):
    assert main(["build-kernels"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["qnpu build-kernels: error: ASCEND_HOME_PATH is not set: install CANN >= 8.5 and source its "
                   "set_env.sh (or pass --ascend-home)"]


def test_cmake_commands_configure_the_package_sources(tmp_path):
    configure, build = kernels.cmake_commands(Path("/cat"), Path("/cann"), tmp_path, 3)
    assert configure[:5] == ["cmake", "-S", str(kernels.CSRC), "-B", str(tmp_path)]
    assert "-DCATLASS_DIR=/cat" in configure and f"-DPython3_EXECUTABLE={sys.executable}" in configure
    assert build == ["cmake", "--build", str(tmp_path), "-j", "3"]


def test_load_without_a_built_library_leaves_the_ops_alone(clean_env, tmp_path):
    assert kernels.library_path(tmp_path) == tmp_path / kernels.LIBRARY_NAME
    clean_env.setenv(kernels.ENV_LIBRARY, str(tmp_path / "x.so"))
    assert kernels.library_path() == tmp_path / "x.so"
    assert kernels.load() is False


def test_the_cpp_registers_only_qnpu_schemas_and_builds_every_source():
    ops = (kernels.CSRC / "torch_ops.cpp").read_text()
    assert "TORCH_LIBRARY_IMPL(qnpu, PrivateUse1, m)" in ops
    registered = re.findall(r'm\.impl\("(\w+)"', ops)
    assert sorted(registered) == ["npu_quant_matmul", "w4a8_matmul"]
    assert set(registered) <= set(SCHEMAS)
    assert f"group_size % {GROUP_STEP} == 0" in ops            # the reference's group rule
    cmake = (kernels.CSRC / "CMakeLists.txt").read_text()
    for src in ("kernels/w8a8_per_token.cpp", "kernels/w4a8.cpp", "torch_ops.cpp"):
        assert src in cmake and (kernels.CSRC / src).is_file()
    assert "add_library(qnpu_catlass SHARED" in cmake and kernels.LIBRARY_NAME == "libqnpu_catlass.so"


_SKIP_SCRIPT = r"""
import sys, warnings
sys.path.insert(0, sys.argv[1])
import torch
import qnpu.lowering
from qnpu.lowering import ascend
from qnpu.lowering.ascend.kernels import has_kernel
from tests.lowering import fake_torch_npu
kernel_lib = torch.library.Library("qnpu", "IMPL")          # stands for the loaded CATLASS library
kernel_lib.impl("npu_quant_matmul", lambda *a, **k: None, "PrivateUse1")
assert not has_kernel("npu_dynamic_quant")
with warnings.catch_warnings():
    warnings.simplefilter("error")
    lib = ascend.register_kernels(fake_torch_npu)
assert has_kernel("npu_dynamic_quant") and has_kernel("npu_quant_matmul")
print("ok")
"""


def test_ascend_target_leaves_ops_with_a_loaded_kernel_alone(tmp_path):
    script = tmp_path / "skip.py"
    script.write_text(_SKIP_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(ROOT)], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


_ROUTE_SCRIPT = r"""
import sys, warnings
sys.path.insert(0, sys.argv[1])
import torch
from qnpu.lowering import LoweringError, W4A8MatmulLinear, lower, plan
from qnpu.models import quantize_model
from qnpu.transforms import recipes
from tests.lowering import fake_torch_npu
from tests.models.test_families import configs, ids, tiny_model
sys.modules["torch_npu"] = fake_torch_npu

def quantized(group):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_model(configs()["llama"])
        return quantize_model(model, recipes.get("w4a8", group_size=group), ids(), progress=False).model.to(torch.bfloat16)

grouped, channel = quantized(32), quantized(None)
try:
    plan(grouped, "ascend")
    print("not refused")
except LoweringError as err:
    assert "qnpu build-kernels" in str(err) and "groups of 32" in str(err), err
before = [type(m).__name__ for m in lower(channel, "ascend").modules() if hasattr(m, "scheme")]
assert "W4A8MatmulLinear" not in before, before
kernel_lib = torch.library.Library("qnpu", "IMPL")          # stands for the loaded CATLASS library
kernel_lib.impl("w4a8_matmul", lambda *a, **k: None, "PrivateUse1")
for model in (grouped, channel):
    mods = [m for m in lower(model, "ascend").modules() if getattr(m, "scheme", "") == "W4A8_DYNAMIC"]
    assert mods and all(isinstance(m, W4A8MatmulLinear) for m in mods), [type(m).__name__ for m in mods]
print("ok")
"""


def test_ascend_target_routes_w4a8_to_the_kernel_op_when_loaded_and_refuses_other_groups_without(tmp_path):
    script = tmp_path / "route.py"
    script.write_text(_ROUTE_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(ROOT)], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.stdout[-500:], proc.stderr[-2000:])
