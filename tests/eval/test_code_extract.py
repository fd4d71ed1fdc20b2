"""Code extraction from chat answers and the programs built from it (HumanEval's canonical
solutions pass through the same path)."""
import gzip
import json

import pytest

from qnpu.eval.code.extract import extract_code, humaneval_program, strip_reasoning
from qnpu.eval.code.sandbox import Limits, run_program
from qnpu.eval.code.tasks import humaneval_path, humaneval_problem

PROMPT = 'from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    """Sum of xs."""\n'


@pytest.mark.parametrize("answer, expected", [
    ("Here you go:\n```python\ndef f():\n    return 1\n```\nHope it helps.", "def f():\n    return 1\n"),
    ("```\ndef f():\n    return 2\n```", "def f():\n    return 2\n"),                       # no language tag
    ("```py\nx = 3\n```", "x = 3\n"),
    ("```Python3 title\nx = 4\n```", "x = 4\n"),
    ("def f():\n    return 5\n", "def f():\n    return 5\n"),                             # no fence: raw text
    ("```python\ndef f():\n    return 6", "def f():\n    return 6\n"),                      # truncated, fence open
    ("```bash\npip install x\n```\n```python\ny = 7\n```", "y = 7\n"),                      # other languages skipped
    ("<think>maybe ```python\nwrong = 1\n```</think>\n```python\nright = 1\n```", "right = 1\n"),
    ("[unused16]thinking[unused17]```python\nz = 8\n```", "z = 8\n"),                     # openPangu reasoning
])
def test_extract_code(answer, expected):
    assert extract_code(answer) == expected


def test_the_block_defining_the_entry_point_wins():
    answer = "```python\nimport math\n```\nThen:\n```python\ndef total(xs):\n    return sum(xs)\n```"
    assert extract_code(answer, "total") == "def total(xs):\n    return sum(xs)\n"
    assert extract_code(answer) == "import math\n"


def test_unclosed_reasoning_is_dropped():
    assert strip_reasoning("answer<think>still thinking when the limit hit") == "answer"
    assert strip_reasoning("</think>after") == "after"


def test_a_full_function_replaces_the_stub_and_keeps_the_preamble():
    program = humaneval_program(PROMPT, "def total(xs):\n    return sum(xs)\n", "total")
    assert program.startswith("from typing import List") and program.count("def total") == 1


@pytest.mark.parametrize("body", ["    return sum(xs)\n", "return sum(xs)\n"])
def test_a_body_completes_the_prompt(body):
    program = humaneval_program(PROMPT, body, "total")
    namespace = {}
    exec(program, namespace)
    assert namespace["total"]([1, 2, 3]) == 6


def test_humaneval_canonical_solutions_pass_in_the_sandbox():
    with gzip.open(humaneval_path(), "rt") as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 164
    for record in records[:3] + records[-2:]:
        problem = humaneval_problem(record)
        result = run_program(problem.program(record["canonical_solution"]), Limits(timeout_s=20))
        assert result.passed, (record["task_id"], result.detail, result.output)
        wrong = run_program(problem.program("    return None\n"), Limits(timeout_s=20))
        assert not wrong.passed
