"""The benchmark loop: incremental per-problem results, a crash in one problem, summaries, report."""
import json
import signal

import pytest

import qnpu.eval.code.suite as suite
from qnpu.cli import Interrupted
from qnpu.eval.code.generate import GenerationConfig, Sample
from qnpu.eval.code.sandbox import Limits
from qnpu.eval.code.tasks import load_problems
from tests.eval.fakes import CharTokenizer
from tests.eval.test_code_tasks import MBPP

ANSWERS = {"11": "Sure:\n```python\ndef add(a, b):\n    return a + b\n```",
           "12": "```python\ndef double(x):\n    return x\n```"}


@pytest.fixture
def problems(tmp_path):
    rows = MBPP + [{**MBPP[1], "task_id": 13}]
    (tmp_path / "mbpp.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return load_problems("mbpp", tmp_path / "mbpp.jsonl")


def fake_generate(model, tokenizer, prompt, config, seed, add_special_tokens=False):
    task_id = next(k for k in ("11", "12", "13") if k in prompt)
    if task_id == "13":
        raise RuntimeError("generation blew up")
    text = ANSWERS[task_id]
    return [Sample(text=text, token_ids=tuple(range(len(text.split()))), hit_limit=False, loop_period=None)]


def test_results_are_written_per_problem_and_a_crash_loses_nothing(tmp_path, problems, monkeypatch):
    monkeypatch.setattr(suite, "generate", fake_generate)
    monkeypatch.setattr(suite, "reference_nll", lambda m, t, c, r: (float(len(r)), len(r)))
    probs, info = problems
    ids = [p.task_id for p in probs]
    for p in probs:  # make each prompt name its task id
        object.__setattr__(p, "instruction", f"[{p.task_id}] " + p.instruction)
    out = tmp_path / "out"
    summary = suite.run_code_eval(None, CharTokenizer(), probs, task="mbpp", output=out, modes=["no_think"],
                                  generation=GenerationConfig(max_new_tokens=32), limits=Limits(timeout_s=20),
                                  data_info=info, progress=False)
    rows = [json.loads(line) for line in (out / "problems.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in rows] == ids
    assert rows[0]["samples"][0]["status"] == "passed" and rows[1]["samples"][0]["status"] == "failed"
    assert rows[2]["error"] == "RuntimeError: generation blew up" and "samples" not in rows[2]
    mode = summary["modes"]["no_think"]
    assert mode["pass_at_k"] == {"1": 0.5} and mode["problems_scored"] == 2 and mode["problems_failed_to_run"] == 1
    assert mode["statuses"] == {"passed": 1, "failed": 1} and mode["repetition_rate"] == 0.0
    assert mode["cot_applied"].startswith("system message")
    assert summary["reference"]["ppl"] == pytest.approx(2.718281828, rel=1e-6)  # nll = tokens -> e
    assert json.loads((out / "summary.json").read_text())["modes"]["no_think"]["pass_at_k"] == {"1": 0.5}
    report = (out / "report.md").read_text()
    assert "| pass@1 | 0.500 |" in report and "generation blew up" in report


def test_an_interrupted_run_keeps_its_finished_problems(tmp_path, problems, monkeypatch):
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise Interrupted(signal.SIGTERM)
        return fake_generate(*args, **kwargs)

    monkeypatch.setattr(suite, "generate", interrupted)
    monkeypatch.setattr(suite, "reference_nll", lambda m, t, c, r: (1.0, 1))
    probs, _ = problems
    for p in probs:
        object.__setattr__(p, "instruction", f"[{p.task_id}] " + p.instruction)
    with pytest.raises(Interrupted) as err:
        suite.run_code_eval(None, CharTokenizer(), probs, task="mbpp", output=tmp_path, modes=[None],
                            limits=Limits(timeout_s=20), progress=False)
    assert err.value.signum == signal.SIGTERM  # the same exception, so the CLI exits 128 + SIGTERM
    assert len((tmp_path / "problems.jsonl").read_text().splitlines()) == 1
    assert json.loads((tmp_path / "summary.json").read_text())["interrupted"] is True


def test_a_tokenizer_without_chat_template_uses_raw_prompts_with_a_warning(tmp_path, problems, monkeypatch):
    seen = []

    def raw_generate(model, tokenizer, prompt, config, seed, add_special_tokens=False):
        seen.append((prompt, add_special_tokens))
        return [Sample(text="def add(a, b):\n    return a + b\n```\nmore", token_ids=(1,), hit_limit=False,
                       loop_period=None)]

    monkeypatch.setattr(suite, "generate", raw_generate)
    monkeypatch.setattr(suite, "reference_nll", lambda m, t, c, r: (1.0, 1))
    probs, _ = problems
    summary = suite.run_code_eval(None, CharTokenizer(None), probs[:1], task="mbpp", output=tmp_path,
                                  modes=["no_think"], limits=Limits(timeout_s=20), progress=False)
    assert seen[0][0].endswith("```python\n") and seen[0][1] is True
    assert "no chat template" in summary["warnings"][0]
    assert summary["modes"]["no_think"]["statuses"] == {"passed": 1}
