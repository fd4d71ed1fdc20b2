"""lm-eval is optional: qnpu imports without it, and `qnpu lm-eval` says how to install it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.eval.fakes import run_cli


def test_without_lm_eval_the_cli_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    code, _, stderr = run_cli(["lm-eval", "default", "--tasks", "qnpu_tiny_mc"])
    assert code == 2 and "lm-eval is not installed" in stderr and "pip install" in stderr


def test_qnpu_imports_without_lm_eval():
    code = ("import sys; sys.modules['lm_eval'] = None; import qnpu.cli, qnpu.jobs, qnpu.eval; "
            "from qnpu.cli import build_parser; build_parser().parse_args(['lm-eval', 'm', '--tasks', 't'])")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
