"""benchmarks/gptq_gpu.py without a GPU: ``--device cuda`` says it skipped (exit 0, nothing written), and a
tiny ``--device cpu`` run goes through the engine end to end, its phases adding up to each layer's total.

The script runs in a subprocess from a temporary folder; nothing is written into the repository."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gptq_gpu.py"
RESULTS = ROOT / "benchmarks" / "results"


def _results_state() -> set:
    return {(p.name, p.stat().st_mtime_ns) for p in RESULTS.iterdir()} if RESULTS.exists() else set()


def _run(tmp_path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_says_skipped_and_writes_nothing(tmp_path):
    before = _results_state()
    out = _run(tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"benchmark": "gptq_gpu", "skipped": "no CUDA device"}
    assert _results_state() == before


def test_a_tiny_cpu_run_times_every_layer_and_writes_nothing(tmp_path):
    before = _results_state()
    out = _run(tmp_path, "--device", "cpu", "--hidden", "128", "--layers", "2", "--samples", "2", "--seq-len", "32",
               "--grids", "g128")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["settings"]["intermediate"] % 128 == 0 and report["settings"]["heads"] == 1
    rows = report["grids"]["g128"]["layers"]
    assert [r["layer"] for r in rows] == [0, 1]
    for r in rows:
        assert abs(r["collect_s"] + r["solve_s"] + r["forward_s"] - r["total_s"]) < 2e-3
        assert min(r["collect_s"], r["solve_s"], r["forward_s"]) >= 0 and 0 < r["output_error"] < 1
    assert "| g128 | 1 |" in out.stderr and _results_state() == before
