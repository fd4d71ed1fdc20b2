"""Problem files: HumanEval's bundled data, MBPP JSONL, malformed lines and missing files."""
import gzip
import json

import pytest

from qnpu.eval.code.sandbox import Limits, run_program
from qnpu.eval.code.tasks import DataError, load_problems, read_jsonl

MBPP = [{"task_id": 11, "text": "Write a function to add two numbers.", "code": "def add(a, b):\n    return a + b",
         "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"], "test_setup_code": "",
         "challenge_test_list": []},
        {"task_id": 12, "text": "Write a function to double a number.", "code": "def double(x):\n    return 2 * x",
         "test_list": ["assert double(4) == 8"]}]


def write(path, lines):
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + b"\n")
    return path


def test_humaneval_from_the_installed_package():
    problems, info = load_problems("humaneval", limit=2)
    assert info["available"] == 164 and info["selected"] == 2 and info["data"].endswith("HumanEval.jsonl.gz")
    assert [p.task_id for p in problems] == ["HumanEval/0", "HumanEval/1"]
    assert problems[0].entry_point == "has_close_elements" and "```python" in problems[0].instruction


def test_mbpp_problems_and_their_reference_programs(tmp_path):
    data = write(tmp_path / "mbpp.jsonl", [json.dumps(r) for r in MBPP])
    problems, info = load_problems("mbpp", data)
    assert [p.task_id for p in problems] == ["11", "12"] and problems[0].entry_point == "add"
    assert "assert add(1, 2) == 3" in problems[0].instruction
    for problem in problems:
        assert run_program(problem.program(problem.reference), Limits(timeout_s=20)).passed
    gz = tmp_path / "mbpp.jsonl.gz"
    gz.write_bytes(gzip.compress(data.read_bytes()))
    assert len(load_problems("mbpp", gz, limit=1)[0]) == 1


def test_malformed_lines_are_reported_by_line_number(tmp_path):
    lines = [json.dumps(MBPP[0]), "", "{not json", "[1, 2]", json.dumps({**MBPP[1], "test_list": []}),
             json.dumps({k: v for k, v in MBPP[1].items() if k != "code"}), b"\xff\xfe", json.dumps(MBPP[0]),
             json.dumps({**MBPP[1], "task_id": 13})]
    data = write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as err:
        read_jsonl(data, "mbpp")
    message = str(err.value)
    for expected in ("6 malformed line(s)", "line 3: invalid JSON", "line 4: a JSON list", "line 5: field 'test_list'",
                     "line 6: missing field 'code'", "line 7: not UTF-8", "--skip-bad"):
        assert expected in message
    records, bad = read_jsonl(data, "mbpp", skip_bad=True)
    assert [r["task_id"] for r in records] == [11, 13]
    assert [b["line"] for b in bad] == [3, 4, 5, 6, 7, 8] and "repeats" in bad[-1]["reason"]
    _, info = load_problems("mbpp", data, skip_bad=True)
    assert [b["line"] for b in info["skipped_lines"]] == [3, 4, 5, 6, 7, 8]


def test_missing_and_unusable_data(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_problems("mbpp", tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="needs --data FILE"):
        load_problems("mbpp")
    with pytest.raises(DataError, match="is not a file"):
        load_problems("mbpp", tmp_path)
    with pytest.raises(DataError, match="holds no mbpp problems"):
        load_problems("mbpp", write(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(DataError, match="--task apps is not supported"):
        load_problems("apps")
    with pytest.raises(DataError, match="--limit 0"):
        load_problems("humaneval", limit=0)
