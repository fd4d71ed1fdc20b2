"""benchmarks/ascend_kernels.py without an NPU: the clean refusal (exit 2, one line), the dry run's
shapes / roofline / kernel blocks, and each variant's call run once on CPU against the checking
torch_npu stand-in (`tests.lowering.fake_torch_npu`), qnpu's ops running their reference.

The script runs in a subprocess from a temporary folder, with a stand-in ``torch_npu`` module put
first on the path, so the results do not depend on the working directory or on whether the real
torch_npu is installed; nothing is written into the repository.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "ascend_kernels.py"
RESULTS = ROOT / "benchmarks" / "results"
M_GRID = [128, 512, 2048, 8192, 16384]
# (K, N) of each linear, from the models' config.json dimensions
SHAPES = {
    "1b": {"qkv_proj": (1536, 3072), "o_proj": (1536, 1536), "gate_up_proj": (1536, 12288), "down_proj": (6144, 1536)},
    "7b": {"qkv_proj": (4096, 6144), "o_proj": (4096, 4096), "gate_up_proj": (4096, 25600), "down_proj": (12800, 4096)},
}

NO_IMPORT = 'raise ImportError("torch_npu blocked by the test")\n'
NO_DEVICE = """class npu:
    is_available = staticmethod(lambda: False)
    device_count = staticmethod(lambda: 0)
"""


def _results_state() -> set:
    return {(p.name, p.stat().st_mtime_ns) for p in RESULTS.iterdir()} if RESULTS.exists() else set()


def _run(tmp_path: Path, *args: str, stand_in: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    if stand_in is not None:
        fake = tmp_path / "stand_in"
        fake.mkdir(exist_ok=True)
        (fake / "torch_npu.py").write_text(stand_in)
        env["PYTHONPATH"] = os.pathsep.join([str(fake)] + [p for p in [env.get("PYTHONPATH")] if p])
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("stand_in, message", [
    (NO_IMPORT, "no Ascend NPU: torch_npu did not import (ImportError: torch_npu blocked by the test)"),
    (NO_DEVICE, "torch_npu imported but no NPU device is available"),
])
def test_without_an_npu_it_exits_2_with_one_line(tmp_path, stand_in, message):
    before = _results_state()
    proc = _run(tmp_path, "--models", "7b", "--m", "128", stand_in=stand_in)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == message
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert _results_state() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stand_in"]


def test_dry_run_lists_every_shape_with_roofline_and_blocks(tmp_path):
    before = _results_state()
    proc = _run(tmp_path, "--dry-run", stand_in=NO_IMPORT)          # needs no torch_npu
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "| 7b | down_proj | 2048 | 12800 | 4096 |" in proc.stderr
    data = json.loads(proc.stdout)
    assert data["dry_run"] is True and data["m"] == M_GRID
    assert data["models"]["1b"]["num_hidden_layers"] == 26 and data["models"]["7b"]["num_hidden_layers"] == 34
    assert data["hardware"]["peak_int8_tops"] == pytest.approx(2 * data["hardware"]["peak_fp16_tflops"])
    got = {(s["model"], s["linear"], s["m"]): s for s in data["shapes"]}
    want = {(model, linear, m) for model, lins in SHAPES.items() for linear in lins for m in M_GRID}
    assert set(got) == want and len(data["shapes"]) == len(want)
    for (model, linear, m), s in got.items():
        assert (s["k"], s["n"]) == SHAPES[model][linear]
        assert s["ops"] == 2 * m * s["k"] * s["n"]
        assert set(s["roofline"]) == set(data["variants"]) and len(s["roofline"]) == 6
        for r in s["roofline"].values():
            assert r["bound_ms"] > 0 and r["bound_ms"] == max(r["compute_ms"], r["memory_ms"])
        for kernel in s["kernels"].values():
            assert kernel["blocks"] == math.ceil(m / 128) * math.ceil(s["n"] / 256) > 0
            assert kernel["waves"] == math.ceil(kernel["blocks"] / 24)
    down = got[("7b", "down_proj", 2048)]
    assert {name: k["blocks"] for name, k in down["kernels"].items()} == {"w8a8_per_token": 256, "w4a8": 256}
    assert down["kernels"]["w8a8_per_token"]["waves"] == 11
    # int8 halves the compute bound of a compute-bound shape; m=128 fp16 down_proj is memory-bound
    assert down["roofline"]["torch_npu_w8a8"]["bound"] == "compute"
    assert down["roofline"]["torch_npu_w8a8"]["compute_ms"] == pytest.approx(down["roofline"]["fp_matmul"]["compute_ms"] / 2)
    assert got[("7b", "down_proj", 128)]["roofline"]["fp_matmul"]["bound"] == "memory"
    assert _results_state() == before and sorted(p.name for p in tmp_path.iterdir()) == ["stand_in"]


def test_dry_run_writes_only_an_explicit_out(tmp_path):
    proc = _run(tmp_path, "--dry-run", "--models", "1b", "--m", "128,512", "--out", "dry/k.json")
    assert proc.returncode == 0, proc.stderr
    written = json.loads((tmp_path / "dry" / "k.json").read_text())
    assert written == json.loads(proc.stdout) and len(written["shapes"]) == 4 * 2
    assert (tmp_path / "dry" / "k.md").exists()


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("ascend_kernels_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module                         # dataclasses look their module up
    dont_write, sys.dont_write_bytecode = sys.dont_write_bytecode, True   # no benchmarks/__pycache__
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.dont_write_bytecode = dont_write
        sys.modules.pop(spec.name, None)


def test_every_variant_call_is_valid_for_torch_npu(script):
    """The benchmark's calls, run once on CPU: torch_npu's ops through the checking stand-in, qnpu's
    through their reference; all share codes and scales, so they agree with torch_npu's W8A8."""
    from tests.lowering import fake_torch_npu
    bench = script.Bench(npu=fake_torch_npu, device="cpu", dtype=torch.bfloat16, warmup=1, repeats=2)
    m, k, n = 16, 512, 256
    torch.manual_seed(0)
    rows = script.measure_shape(bench, "test", "tiny", m, k, n, script.weights(bench, k, n))
    by = {r["variant"]: r for r in rows}
    assert set(by) == set(script.VARIANTS)
    assert all(r["status"] == "ok" for r in rows), [(r["variant"], r["error"]) for r in rows if r["error"]]
    for r in rows:
        assert r["median_ms"] > 0 and r["throughput"] > 0 and r["roofline_ms"] > 0
        assert r["speedup_vs_fp"] > 0 and r["speedup_vs_torch_npu_w8a8"] > 0
    assert by["torch_npu_w8a8"]["speedup_vs_torch_npu_w8a8"] == 1.0
    assert by["qnpu_w8a8"]["rel_diff_vs_torch_npu_w8a8"] == 0.0
    assert by["qnpu_w4a8_channel"]["rel_diff_vs_torch_npu_w8a8"] == 0.0
    assert by["qnpu_w4a8_g128"]["rel_diff_vs_torch_npu_w8a8"] < 1e-2
    assert by["torch_npu_a8w4"]["rel_diff_vs_torch_npu_w8a8"] < 1e-2
    calls = {c["op"] for c in fake_torch_npu.CALLS}
    assert {"npu_quant_matmul", "npu_trans_quant_param", "npu_convert_weight_to_int4pack"} <= calls
    totals = script.totals(rows, ["1b"])
    assert totals == {}                                     # one linear of four: no per-forward total
