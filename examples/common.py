"""Shared pieces of the paper scripts in this folder: argument lists, the reference-solution
perplexity signal, and result files written after every finished cell (a crash or Ctrl-C keeps what
was measured; rerunning the same command skips the finished cells)."""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch


def csv(text: str, cast=str) -> list:
    """``"a,b"`` -> ``["a", "b"]`` (each item cast), refusing empty items."""
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise SystemExit(f"error: {text!r} has an empty item; give a comma-separated list")
    try:
        return [cast(item) for item in items]
    except ValueError:
        raise SystemExit(f"error: {text!r}: every item must be a {cast.__name__}") from None


def environment() -> str:
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}"


def reference_perplexity(model, tokenizer, limit: int | None) -> dict:
    """The conditional perplexity of HumanEval's reference solutions given their prompts (teacher
    forcing, no generation): the signal that still separates models whose pass@1 is near 0."""
    from qnpu.eval.code import load_problems, reference_nll
    from qnpu.eval.code.suite import summarize_reference

    problems, _ = load_problems("humaneval", None, limit=limit)
    refs = {}
    for problem in problems:
        nll, tokens = reference_nll(model, tokenizer, problem.reference_context, problem.reference)
        refs[problem.task_id] = {"nll": nll, "tokens": tokens}
    summary = summarize_reference(refs)
    return {"ppl": summary["ppl"], "problems": summary["problems"], "tokens": summary["tokens"]}


def finite_or_none(value):
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


class Results:
    """``<folder>/<stem>.json`` holding ``{"setup": ..., "cells": {key: row}}``, rewritten atomically
    after every cell. Cells of an earlier run with the same setup are reused; a changed setup starts
    afresh (the old file is kept as ``<stem>.json.old``)."""

    def __init__(self, folder: Path, stem: str, setup: dict):
        self.path = folder / f"{stem}.json"
        folder.mkdir(parents=True, exist_ok=True)
        self.data = {"setup": setup, "env": environment(), "cells": {}}
        if self.path.is_file():
            old = json.loads(self.path.read_text())
            if old.get("setup") == setup:
                self.data["cells"] = old.get("cells", {})
            else:
                os.replace(self.path, self.path.with_suffix(".json.old"))

    def __contains__(self, key: str) -> bool:
        return key in self.data["cells"] and "error" not in self.data["cells"][key]

    def put(self, key: str, row: dict) -> None:
        self.data["cells"][key] = row
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, allow_nan=False, default=str) + "\n")
        os.replace(tmp, self.path)


def qnpu_cli(*args: str) -> dict:
    """Run ``qnpu ARGS --json`` in a child process (its memory is returned when it ends) and return the
    JSON it prints; a failure raises with the child's last error line."""
    cmd = [sys.executable, "-c", "import sys; from qnpu.cli import main; sys.exit(main())", *args, "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"qnpu {' '.join(args)} exited {done.returncode}: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])
