"""The code-benchmark run: generate, extract, execute in the sandbox, score, and write results.

For each CoT mode and each problem: build the prompt (`prompts.build_prompt`), generate ``n``
samples, extract each one's code and run the problem's program in the sandbox; append one JSON line
per (problem, mode) to ``problems.jsonl`` in the output folder as soon as it is done (flushed), so
an interrupted or crashing run keeps every finished problem. A problem whose generation or
scoring raises is recorded with its ``error`` and the run goes on. The reference solution's
conditional perplexity is computed once per problem (it does not depend on the mode). At the end
``summary.json`` (the returned dict) and ``report.md`` are written; an interrupted run (Ctrl-C)
writes them for the finished problems, with ``"interrupted": true``, and re-raises.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from qnpu.eval.code.extract import extract_code
from qnpu.eval.code.generate import GenerationConfig, generate, reference_nll
from qnpu.eval.code.metrics import distribution, mean_pass_at_k, pass_at_k, report_ks
from qnpu.eval.code.prompts import build_prompt, template_style
from qnpu.eval.code.report import write_report
from qnpu.eval.code.sandbox import STATUSES, Limits, isolation, run_program
from qnpu.eval.code.tasks import Problem
from qnpu.eval.perplexity import ppl_of

ROWS_FILE, SUMMARY_FILE, REPORT_FILE = "problems.jsonl", "summary.json", "report.md"
OUTPUT_KEEP = 600  # characters of a failing program's output kept per sample


def finite(data):
    """``data`` with non-finite floats replaced by None, at any depth (strict JSON)."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite(v) for v in data]
    return data


def mode_name(mode: str | None) -> str:
    return mode or "default"


def _warn(message: str, warnings: list, progress: bool) -> None:
    warnings.append(message)
    if progress:
        print(f"qnpu: warning: {message}", file=sys.stderr, flush=True)


def _reference(model, tokenizer, problem: Problem) -> dict:
    try:
        nll, tokens = reference_nll(model, tokenizer, problem.reference_context, problem.reference)
    except Exception as err:  # noqa: BLE001 - one problem's failure is recorded, the run goes on
        return {"error": f"{type(err).__name__}: {err}"}
    return {"nll": nll, "tokens": tokens, "ppl": ppl_of(nll / tokens) if tokens else None}


def _score(problem: Problem, samples, how: dict, limits: Limits, sandbox: str) -> list[dict]:
    rows = []
    for sample in samples:
        text = problem.raw_completion(sample.text) if how["format"] == "raw" else sample.text
        code = extract_code(text, problem.entry_point)
        result = run_program(problem.program(code), limits, mode=sandbox)
        rows.append({"status": result.status, "detail": result.detail, "tokens": sample.n_tokens,
                     "words": sample.n_words, "hit_limit": sample.hit_limit, "loop_period": sample.loop_period,
                     "seconds": result.seconds, "completion": sample.text,
                     **({"output": result.output[-OUTPUT_KEEP:]} if not result.passed and result.output else {})})
    return rows


def run_problem(model, tokenizer, problem: Problem, index: int, mode: str | None, generation: GenerationConfig,
                limits: Limits, sandbox: str, reference: dict) -> dict:
    """One problem in one mode: the JSON-ready row of ``problems.jsonl``."""
    row: dict = {"task_id": problem.task_id, "mode": mode_name(mode), "reference": reference}
    start = time.perf_counter()
    try:
        prompt, how = build_prompt(tokenizer, problem.instruction, problem.raw_prompt, mode)
        row.update(prompt_format=how["format"], cot_applied=how["cot_applied"])
        samples = generate(model, tokenizer, prompt, generation, generation.seed + index,
                           add_special_tokens=how["format"] == "raw")
        row["samples"] = _score(problem, samples, how, limits, sandbox)
    except Exception as err:  # noqa: BLE001 - recorded; the other problems still run
        row["error"] = f"{type(err).__name__}: {err}"[:1000]
    if "samples" in row:
        n, c = len(row["samples"]), sum(s["status"] == "passed" for s in row["samples"])
        row.update(n=n, passed=c, pass_at_k={str(k): pass_at_k(n, c, k) for k in report_ks(n)})
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def summarize_mode(rows: list[dict], n: int) -> dict:
    scored = [r for r in rows if "samples" in r]
    samples = [s for r in scored for s in r["samples"]]
    statuses = {k: 0 for k in STATUSES}
    for s in samples:
        statuses[s["status"]] += 1
    loops = sum(s["loop_period"] is not None for s in samples)
    applied = sorted({r["cot_applied"] for r in rows if "cot_applied" in r})
    return {
        "problems": len(rows), "problems_scored": len(scored), "problems_failed_to_run": len(rows) - len(scored),
        "samples": len(samples), "cot_applied": applied[0] if len(applied) == 1 else applied,
        "pass_at_k": {str(k): mean_pass_at_k([(r["n"], r["passed"]) for r in scored], k) for k in report_ks(n)},
        "statuses": {k: v for k, v in statuses.items() if v},
        "length_tokens": distribution([s["tokens"] for s in samples]),
        "length_words": distribution([s["words"] for s in samples]),
        "hit_limit_rate": sum(s["hit_limit"] for s in samples) / len(samples) if samples else None,
        "repetition_failures": loops,
        "repetition_rate": loops / len(samples) if samples else None,
    }


def summarize_reference(references: dict) -> dict:
    ok = [r for r in references.values() if "nll" in r and r["tokens"]]
    nll, tokens = sum(r["nll"] for r in ok), sum(r["tokens"] for r in ok)
    return {"problems": len(ok), "errors": len(references) - len(ok), "tokens": tokens,
            "nll": nll / tokens if tokens else None, "ppl": ppl_of(nll / tokens) if tokens else None,
            "per_problem_ppl": distribution([r["ppl"] for r in ok])}


def _plots(summary: dict, folder: Path, warnings: list, progress: bool) -> list[str]:
    """PNGs of pass@1, repetition failures and answer lengths per mode beside report.md; a failure
    to draw them is a warning (the results are kept)."""
    try:
        from qnpu.eval.compare import normalise_code
        from qnpu.eval.plots import code_plots

        label = (summary["model"] or {}).get("name") or "model"
        drawn = code_plots(folder, {label: normalise_code(summary, folder / SUMMARY_FILE)["modes"]})
    except Exception as err:  # noqa: BLE001 - a plotting failure must not lose the results
        _warn(f"plots not written ({type(err).__name__}: {err})", warnings, progress)
        return []
    return [str(folder / d["file"]) for d in drawn]


def run_code_eval(model, tokenizer, problems: list[Problem], *, task: str, output: str | os.PathLike,
                  modes: list[str | None], generation: GenerationConfig = GenerationConfig(),
                  limits: Limits = Limits(), model_info: dict | None = None, data_info: dict | None = None,
                  progress: bool = True) -> dict:
    """Run the benchmark (see the module docstring) and return the summary."""
    start = time.perf_counter()
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    warnings: list[str] = []
    sandbox = isolation()
    if template_style(tokenizer) == "none":
        _warn("the tokenizer has no chat template: prompting with the raw task prompt (completion style); "
              "--cot cannot be applied", warnings, progress)
    if sandbox != "namespaces":
        _warn("no usable 'unshare' here: the sandbox blocks sockets in Python only and has no PID namespace "
              "(see docs/architecture.md, Evaluation suite)", warnings, progress)
    summary: dict = {"task": task, "model": model_info or {}, "data": data_info or {}, "problems": len(problems),
                     "cot": [mode_name(m) for m in modes], "generation": vars(generation).copy(),
                     "sandbox": {"isolation": sandbox, "limits": vars(limits).copy()},
                     "outputs": {"problems": str(folder / ROWS_FILE), "summary": str(folder / SUMMARY_FILE),
                                 "report": str(folder / REPORT_FILE)}}
    references: dict = {}
    per_mode: dict = {mode_name(m): [] for m in modes}
    interrupted = None
    try:
        with open(folder / ROWS_FILE, "w", encoding="utf-8") as rows_file, \
                tqdm(total=len(problems) * len(modes), desc=task, unit="problem", file=sys.stderr,
                     disable=not progress) as bar:
            for mode in modes:
                for index, problem in enumerate(problems):
                    if problem.task_id not in references:
                        references[problem.task_id] = _reference(model, tokenizer, problem)
                    row = run_problem(model, tokenizer, problem, index, mode, generation, limits, sandbox,
                                      references[problem.task_id])
                    per_mode[mode_name(mode)].append(row)
                    rows_file.write(json.dumps(finite(row), allow_nan=False) + "\n")
                    rows_file.flush()
                    bar.update(1)
    except KeyboardInterrupt as err:  # also SIGTERM / SIGHUP, raised as a KeyboardInterrupt by the CLI
        interrupted = err
    summary["reference"] = summarize_reference(references)
    summary["modes"] = {name: summarize_mode(rows, generation.n) for name, rows in per_mode.items()}
    summary["outputs"]["plots"] = _plots(summary, folder, warnings, progress)
    summary["warnings"] = warnings
    summary["interrupted"] = interrupted is not None
    summary["wall_seconds"] = round(time.perf_counter() - start, 2)
    tmp = folder / f".{SUMMARY_FILE}.tmp"
    tmp.write_text(json.dumps(finite(summary), indent=2, default=str, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, folder / SUMMARY_FILE)
    write_report(summary, per_mode, folder / REPORT_FILE)
    if interrupted is not None:
        raise interrupted
    return summary
