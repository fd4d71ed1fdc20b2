"""End-to-end time of the default job without evaluation: ``qnpu quantize --no-eval`` (default model,
default recipe w8a8-dynamic, 128 x 512 calibration tokens) in a fresh subprocess, as a user runs it.

    python benchmarks/quantize_time.py [--label after] [--recipe NAME] [--repeat N] [--keep DIR] [-- EXTRA ARGS]

Reports the subprocess's wall time (interpreter start and imports included) and the phases the
job's report exposes: ``quantize_seconds`` (the block-by-block engine), ``wall_seconds`` (the job
itself), their difference (loading the model, tokenizing, saving the checkpoint) and the start-up
(subprocess wall minus the job's wall); the subprocess's CPU seconds (user + system); how many
cores other processes kept busy meanwhile (the machine's busy CPU time from ``/proc/stat`` minus
the subprocess's, over its wall time) and the load average before and after each run. The
machine is shared: the numbers only mean something beside the load. The qnpu that runs is the one
the interpreter imports (``PYTHONPATH=<other checkout>`` times another commit; its commit is
recorded). Runs are kept by ``--label`` in benchmarks/results/quantize_time.{json,md}, so a
"before" and an "after" run sit side by side. Prints JSON and a markdown table.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    """git in the checkout of the qnpu the subprocess imports (PYTHONPATH may point at another one)."""
    spec = importlib.util.find_spec("qnpu")
    where = Path(spec.origin).parent.parent if spec is not None and spec.origin else ROOT
    try:
        return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _children_cpu() -> float:
    """User + system CPU seconds of the waited-for child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _machine_busy() -> float | None:
    """CPU seconds every core has spent busy since boot (Linux ``/proc/stat``; None elsewhere)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def run_once(recipe: str, extra: list[str], keep: str | None = None) -> dict:
    """One ``qnpu quantize --no-eval --json`` in a subprocess writing to a temporary folder (or to
    ``keep``, replaced, to compare checkpoints afterwards)."""
    with tempfile.TemporaryDirectory(prefix="qnpu-quantize-time-") as tmp:
        out = ["--output", keep, "--overwrite"] if keep else ["--output", str(Path(tmp) / "out")]
        cmd = [sys.executable, "-m", "qnpu.cli", "quantize", "--no-eval", "--recipe", recipe, *out, "--json", *extra]
        load_before, cpu_before, busy_before = os.getloadavg()[0], _children_cpu(), _machine_busy()
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        load_after, cpu, busy = os.getloadavg()[0], _children_cpu() - cpu_before, _machine_busy()
        others = None if busy is None or busy_before is None else max(0.0, (busy - busy_before - cpu) / seconds)
    if proc.returncode != 0:
        raise SystemExit(f"qnpu quantize failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    job, engine = report["wall_seconds"], report["quantize_seconds"]
    return {"subprocess_seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2), "job_seconds": job,
            "quantize_seconds": engine,
            "load_and_save_seconds": round(job - engine, 2), "startup_seconds": round(seconds - job, 2),
            "error_sample_tokens": report.get("error_sample_tokens"),
            "other_busy_cores": None if others is None else round(others, 2),
            "loadavg_1min_before": round(load_before, 2), "loadavg_1min_after": round(load_after, 2)}


def table(runs: list[dict]) -> str:
    head = ("| label | commit | recipe | end to end s | CPU s | job s | engine (quantize) s | load + save s | "
            "start-up s | error sample tokens | cores busy with others | load avg before / after | cores |\n"
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|\n")
    rows = []
    for r in runs:
        for m in r["measurements"]:
            rows.append(f"| {r['label']} | {r['commit']} | {r['recipe']} | {m['subprocess_seconds']} | "
                        f"{m.get('cpu_seconds', '-')} | "
                        f"{m['job_seconds']} | {m['quantize_seconds']} | {m['load_and_save_seconds']} | "
                        f"{m['startup_seconds']} | {m['error_sample_tokens'] or '-'} | "
                        f"{'-' if m.get('other_busy_cores') is None else m['other_busy_cores']} | "
                        f"{m['loadavg_1min_before']} / {m['loadavg_1min_after']} | {r['cpus']} |")
    return head + "\n".join(rows) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--label", default="latest", help="name of this run in the results (replaces a run of "
                        "the same label)")
    parser.add_argument("--recipe", default="w8a8-dynamic")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--keep", default=None, metavar="DIR", help="write the checkpoint to DIR (replaced) "
                        "instead of a temporary folder")
    parser.add_argument("extra", nargs="*", help="more qnpu quantize arguments (after --)")
    args = parser.parse_args()
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no", "--", "qnpu"))
    commit = _git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")  # what runs, read before it runs
    measurements = [run_once(args.recipe, args.extra, args.keep) for _ in range(args.repeat)]
    run = {"label": args.label, "commit": commit,
           "recipe": args.recipe, "extra_args": args.extra, "measurements": measurements,
           "cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "quantize_time.json"
    try:
        runs = [r for r in json.loads(path.read_text())["runs"] if r["label"] != args.label]
    except (OSError, ValueError, KeyError, TypeError):
        runs = []
    runs.append(run)
    path.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    (RESULTS / "quantize_time.md").write_text(table(runs))
    print(json.dumps(run))
    print(table(runs), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
