"""benchmarks/accuracy.py --merge: later runs win per recipe, and --before shows each shared recipe's change."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "accuracy.py"


def _run_file(path: Path, rows: list[tuple], env: str) -> Path:
    data = {"model": "m", "samples": 4, "eval_tokens": 64, "env": env,
            "baseline": {"docs": {"ppl": 10.0}, "code": {"ppl": 5.0}},
            "rows": [{"recipe": r, "docs": d, "code": c, "quantize_seconds": s, "linear_weight_bytes": 2**20}
                     for r, d, c, s in rows]}
    path.write_text(json.dumps(data))
    return path


def test_merge_with_before_table(tmp_path):
    old = _run_file(tmp_path / "old.json", [("w4a16-gptq", 17.0, 11.0, 600.0), ("w4a16-awq", 18.0, 12.0, 900.0)], "a")
    new = _run_file(tmp_path / "new.json", [("w4a16-awq", 16.5, 11.5, 300.0)], "b")
    out = tmp_path / "merged"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(SCRIPT), "--merge", f"{old},{new}", "--before", f"{old}=main",
                    "--out", str(out)], check=True, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    merged = json.loads(out.with_suffix(".json").read_text())
    by = {r["recipe"]: r for r in merged["rows"]}
    assert by["w4a16-awq"]["docs"] == 16.5 and by["w4a16-gptq"]["docs"] == 17.0  # the later run wins
    md = out.with_suffix(".md").read_text()
    assert "| w4a16-awq | 18.000 -> 16.500 | 12.000 -> 11.500 | 900.0 -> 300.0 |" in md
    assert "| w4a16-gptq | 17.000 ->" not in md  # not measured again: no before -> after line
    assert "Before -> after (main;" in md
