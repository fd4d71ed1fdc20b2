"""``qnpu lm-eval``: lm-evaluation-harness tasks on a qnpu model (`qnpu.eval.lm_eval_model.QnpuLM`).

Everything is checked before the model is loaded: lm-eval installed, the task names (looked up in
``--include-path`` alone when every name is there, else in lm-eval's own tasks too), counts,
target, device, model path; then the tasks' data are loaded (a dataset that cannot be reached is a
one-line error naming the task), the output folder is created and the model loaded. Results go to
the output folder: ``results.json`` (lm-eval's results without the per-sample records),
``samples_<task>.jsonl`` (one line per document: arguments, responses, metrics) and ``results.md``
(lm-eval's tables); each file is written whole under a temporary name and renamed into place.
lm-eval is imported only when a run starts.
"""
from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import random
import time
from pathlib import Path

import qnpu
from qnpu.models.loading import DEFAULT_NAMES

INSTALL = "pip install lm_eval==0.4.13 (or pip install -e '.[lmeval]')"
MODEL_ARGS = ("max_length", "add_bos_token", "prefix_token_id", "softmax_dtype", "logits_cache", "truncation",
              "max_batch_size")


def require_lm_eval():
    """The ``lm_eval`` module, or a ValueError saying how to install it."""
    try:
        import lm_eval
    except ImportError:
        raise ValueError(f"lm-eval is not installed; {INSTALL}") from None
    return lm_eval


def parse_tasks(text: str | None) -> list[str]:
    names = [t.strip() for t in (text or "").split(",") if t.strip()]
    if not names:
        raise ValueError("--tasks is empty; give comma-separated lm-eval task names (e.g. arc_easy,hellaswag)")
    return names


def parse_model_args(text: str | None) -> dict:
    """``k=v,...`` (lm-eval's syntax, values typed as lm-eval types them) for the HFLM arguments
    that have no flag of their own."""
    if not text:
        return {}
    from lm_eval.utils import simple_parse_args_string

    try:
        args = simple_parse_args_string(text)
    except ValueError as err:
        raise ValueError(f"--model-args {text!r} is malformed ({err}); write key=value,key=value") from None
    unknown = sorted(set(args) - set(MODEL_ARGS))
    if unknown:
        raise ValueError(f"--model-args {unknown[0]} is not an argument here; allowed: {', '.join(MODEL_ARGS)}")
    return args


def task_manager(names: list[str], include_path: str | None):
    """A TaskManager that knows every name in ``names`` (a registered task, group or tag, or a YAML
    file): ``include_path`` alone when it holds them all (indexing lm-eval's ~15,000 built-in tasks
    takes seconds), else with the built-in ones. Unknown names: ValueError with close matches."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise ValueError(f"--include-path {include_path} is not a folder of task YAML files")

    def missing(tm) -> list[str]:
        return [n for n in names if n not in tm.all_tasks and not (n.endswith((".yaml", ".yml")) and Path(n).is_file())]

    if include_path is not None:
        tm = TaskManager(include_path=include_path, include_defaults=False)
        if not missing(tm):
            return tm
    tm = TaskManager(include_path=include_path)
    unknown = missing(tm)
    if unknown:
        near = difflib.get_close_matches(unknown[0], tm.all_tasks, n=3)
        raise ValueError(f"unknown task {unknown[0]}" + (f" (did you mean {', '.join(near)}?)" if near else "")
                         + "; `lm-eval ls tasks` lists them, --include-path adds a folder of task YAML files")
    return tm


def load_tasks(tm, names: list[str]) -> list:
    """The Task / Group objects of ``names`` with their data loaded; a dataset that cannot be loaded
    (offline, missing files) is a ValueError naming the task."""
    out = []
    for name in names:
        try:
            loaded = tm.load([name])
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as err:  # noqa: BLE001 - datasets / hub / YAML errors alike
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise ValueError(f"task {name} could not be loaded ({type(err).__name__}: {first}); its dataset may "
                             "need the Hugging Face hub: run where it is reachable, or point the task at local "
                             "files") from err
        groups = loaded.get("groups") or {}
        out += [groups[name]] if name in groups else list(loaded["tasks"].values())
    return out


class _Expected(logging.Filter):
    """Drops lm-eval's warnings about what qnpu does on purpose: HFLM given a loaded model (qnpu
    loads it), and a task with its own loader told about lm-eval's ``--metadata`` flag."""

    EXPECTED = ("`pretrained` model kwarg is not of type", "Passed an already-initialized model",
                "Custom kwargs can be passed to `--metadata`")

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not any(text in message for text in self.EXPECTED)


def quiet_expected_warnings() -> None:
    for name in ("lm_eval.models.huggingface", "lm_eval.api.task"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _Expected) for f in log.filters):
            log.addFilter(_Expected())


def check_arguments(*, model: str | None, tasks: str, limit: int | None, num_fewshot: int | None,
                    batch_size: int | str, device: str, lowered: str | None, dtype: str, model_args: str | None,
                    output: str | None) -> tuple[list[str], dict, Path]:
    """Everything that can be checked without lm-eval's task index or the model: ``(task names,
    HFLM arguments, output folder)``; a ValueError (FileNotFoundError for the model path) otherwise."""
    require_lm_eval()
    names = parse_tasks(tasks)
    for flag, value, low in (("--limit", limit, 1), ("--num-fewshot", num_fewshot, 0)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValueError(f"{flag} {value!r} is invalid; allowed: an integer >= {low}")
    if not (batch_size == "auto" or (isinstance(batch_size, int) and not isinstance(batch_size, bool)
                                     and batch_size >= 1)):
        raise ValueError(f"--batch-size {batch_size!r} is invalid; allowed: an integer >= 1 or auto")
    extra = parse_model_args(model_args)
    from qnpu.eval.lm_eval_model import DTYPES
    from qnpu.lowering import check_target
    from qnpu.models.devices import resolve_device

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype} is invalid; allowed: {', '.join(DTYPES)}")
    resolve_device(device)
    if lowered is not None:
        try:
            check_target(lowered)
        except ValueError as err:
            raise ValueError(f"--lowered: {err}") from None
    if model not in DEFAULT_NAMES and not Path(model).exists():
        raise FileNotFoundError(f"model path {model} does not exist; pass a Hugging Face folder, a .gguf file, a "
                                "qnpu checkpoint, or 'default'")
    folder = Path(output if output is not None else Path("qnpu-out") / "lm-eval")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--output {folder} is a file; give a folder")
    return names, extra, folder


def run_lm_eval(*, model: str | None, tasks: str, include_path: str | None = None, limit: int | None = None,
                num_fewshot: int | None = None, batch_size: int | str = 1, device: str = "cpu",
                lowered: str | None = None, dtype: str = "float32", model_args: str | None = None,
                output: str | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Run lm-eval ``tasks`` (comma-separated) on ``model`` and write the results to ``output``
    (default ``qnpu-out/lm-eval``); returns the compact summary (`summarize`). lm-eval seeds the
    global generators with ``seed``; they are put back as they were afterwards."""
    start = time.perf_counter()
    names, extra, folder = check_arguments(model=model, tasks=tasks, limit=limit, num_fewshot=num_fewshot,
                                           batch_size=batch_size, device=device, lowered=lowered, dtype=dtype,
                                           model_args=model_args, output=output)
    tm = task_manager(names, include_path)
    quiet_expected_warnings()
    with _global_rng_kept():
        task_objects = load_tasks(tm, names)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"--output {folder} cannot be created ({err.strerror or err}); choose another "
                             "--output") from None
        import lm_eval

        from qnpu.eval.lm_eval_model import QnpuLM

        lm = QnpuLM(pretrained=model, lowered=lowered, device=device, dtype=dtype, batch_size=batch_size,
                    progress=progress, **extra)
        results = lm_eval.simple_evaluate(model=lm, tasks=task_objects, task_manager=tm, num_fewshot=num_fewshot,
                                          limit=limit, log_samples=True, random_seed=seed, numpy_random_seed=seed,
                                          torch_random_seed=seed, fewshot_random_seed=seed)
    # simple_evaluate records an LM object's config name and no batch size or device: say what ran
    results["config"].update(model=lm.qnpu_source.get("path", lm.qnpu_source["name"]), model_args=model_args,
                             batch_size=batch_size, device=device, lowered=lowered, dtype=dtype,
                             qnpu=qnpu.__version__)
    outputs = write_results(folder, results)
    summary = summarize(results)
    return {"model": lm.qnpu_source, "lowered": lowered, "device": device, "dtype": dtype, **summary,
            "outputs": outputs, "wall_seconds": round(time.perf_counter() - start, 2)}


@contextlib.contextmanager
def _global_rng_kept():
    """Python's, numpy's and torch's (CPU and CUDA) global random states as they were, afterwards."""
    import numpy as np
    import torch

    state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []):
        try:
            yield
        finally:
            random.setstate(state[0])
            np.random.set_state(state[1])


def _metrics(row: dict) -> dict:
    """``{"acc": 0.5, "acc_stderr": 0.1, ...}`` out of lm-eval's ``{"acc,none": .., "acc_stderr,none": ..}``
    (a filter other than ``none`` stays in the name: ``exact_match,strict-match``)."""
    out = {}
    for key, value in row.items():
        if "," not in key:
            continue
        metric, _, filt = key.partition(",")
        name = metric if filt == "none" else key
        out[name] = value if isinstance(value, (int, float)) else None  # "N/A" stderr: none computed
    return out


def summarize(results: dict) -> dict:
    """Per task: samples evaluated (of how many), few-shot count and metrics; per group: metrics."""
    n = results.get("n-samples", {})
    configs = results.get("configs", {})
    tasks = {name: {"samples": n.get(name, {}).get("effective"), "of": n.get(name, {}).get("original"),
                    "num_fewshot": configs.get(name, {}).get("num_fewshot"), "metrics": _metrics(row)}
             for name, row in results["results"].items() if name in n}
    groups = {name: {"metrics": _metrics(row)} for name, row in results.get("groups", {}).items()}
    return {"tasks": tasks, "groups": groups}


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_results(folder: Path, results: dict) -> dict:
    """``results.json``, ``samples_<task>.jsonl`` per task and ``results.md``; returns their paths."""
    from lm_eval.utils import handle_non_serializable, make_table

    def dumps(obj, **kw) -> str:
        return json.dumps(obj, default=handle_non_serializable, ensure_ascii=False, **kw)

    paths = {}
    for task, rows in results.get("samples", {}).items():
        path = folder / f"samples_{task}.jsonl"
        _write(path, "".join(dumps(r) + "\n" for r in rows))
        paths[f"samples_{task}"] = str(path)
    _write(folder / "results.json", dumps({k: v for k, v in results.items() if k != "samples"}, indent=2) + "\n")
    table = make_table(results) + ("\n" + make_table(results, "groups") if results.get("groups") else "")
    _write(folder / "results.md", table + "\n")
    paths.update(results=str(folder / "results.json"), table=str(folder / "results.md"))
    return paths


def _stderr(name: str) -> str:
    metric, comma, filt = name.partition(",")
    return f"{metric}_stderr{comma}{filt}"


def summary_lines(data: dict) -> dict:
    """The plain-text view: one line per task and group, then where the files are."""
    model = data["model"]
    out = {"model": f"{model.get('name')} ({model.get('kind')})" + (f", lowered {data['lowered']}"
                                                                     if data["lowered"] else "")}
    for kind, rows in (("task", data["tasks"]), ("group", data["groups"])):
        for name, row in rows.items():
            metrics = ", ".join(f"{k} {v:.4f}" + (f" ± {row['metrics'][_stderr(k)]:.4f}"
                                                   if row["metrics"].get(_stderr(k)) is not None else "")
                                for k, v in row["metrics"].items() if "_stderr" not in k and v is not None)
            count = f" ({row['samples']} of {row['of']} samples, {row['num_fewshot']}-shot)" if kind == "task" else ""
            out[f"{kind} {name}"] = (metrics or "-") + count
    out["results"] = data["outputs"]["results"]
    out["time"] = f"{data['wall_seconds']:.1f} s"
    return out
