"""``qnpu report``: several runs side by side (e.g. FP vs w8a8-dynamic vs w4a8) in one comparison.

A *run* is a folder holding any of (a file of that name may be given instead):

* ``summary.json``: a code benchmark (`qnpu eval --task`): pass@1, repetition rate and answer
  lengths per CoT mode, the reference solutions' perplexity;
* ``eval.json``: a perplexity evaluation (`qnpu eval --output DIR`): perplexity per slice (and of
  ``--text``, and lowered);
* ``efficiency.json``: prefill / decode latency and memory (`qnpu eval --efficiency`);
* ``qnpu.json``: a checkpoint (`qnpu quantize`): its per-linear output errors, and the quantized
  perplexity of its quantize report where the run has no ``eval.json``.

`load_run` reads one run, `compare` normalises the runs into one JSON-ready structure (values keyed
by run label, in the order the runs were given; the first run holding a section is its baseline);
`qnpu.eval.compare_report` writes it out as ``comparison.json``, ``report.md`` and PNGs. Sections
no run holds are left out and listed under ``omitted``. See docs/architecture.md, "Reports".
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from qnpu.eval.code.suite import finite
from qnpu.models.families import FAMILIES

FILES = {"code": "summary.json", "perplexity": "eval.json", "efficiency": "efficiency.json",
         "checkpoint": "qnpu.json"}
EVAL_FILE = FILES["perplexity"]
COMPARISON_FILE, REPORT_FILE = "comparison.json", "report.md"


def write_json(path: str | os.PathLike, data) -> None:
    """Strict JSON (non-finite floats as null), written atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(finite(data), indent=2, default=str, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def results_folder(output: str | os.PathLike) -> Path:
    """An evaluation's ``--output`` folder, created (an existing file is refused)."""
    folder = Path(output)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--output {folder} is a file; give a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--output {folder} cannot be created ({err.strerror or err}); choose another --output") \
            from None
    return folder


def read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{file} cannot be read as JSON ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} is not a JSON object")
    return data


def _need(data: dict, file: Path, *keys: str):
    """``data[k0][k1]...``, or an error naming the file and the missing key."""
    for i, key in enumerate(keys):
        if not isinstance(data, dict) or key not in data:
            raise ValueError(f"{file} has no {'.'.join(keys[:i + 1])}: not a qnpu result of that kind")
        data = data[key]
    return data


def load_run(path: str | os.PathLike, label: str | None = None) -> dict:
    """One run: ``{"label", "path", "model", "code", "perplexity", "efficiency", "checkpoint",
    "sources"}`` with None for what the folder does not hold; a missing path, or a folder holding
    none of the files, is an error."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path} does not exist; give a qnpu eval results folder, an efficiency.json folder or "
                         "a qnpu checkpoint")
    if path.is_file():
        kinds = [k for k, name in FILES.items() if name == path.name]
        if not kinds:
            raise ValueError(f"{path} is not a qnpu result file ({', '.join(FILES.values())})")
        found = {kinds[0]: path}
    else:
        found = {k: path / name for k, name in FILES.items() if (path / name).is_file()}
        if not found:
            raise ValueError(f"{path} holds no qnpu results (none of {', '.join(FILES.values())})")
    run = {"label": label or (path.parent.name if path.is_file() else path.resolve().name), "named": bool(label),
           "path": str(path),
           "sources": {k: str(v) for k, v in found.items()}}
    data = {k: read_json(v) for k, v in found.items()}
    for kind, normalise in (("code", normalise_code), ("checkpoint", _checkpoint), ("perplexity", _perplexity),
                            ("efficiency", _efficiency)):
        try:
            run[kind] = normalise(data[kind], found[kind]) if kind in data else None
        except (KeyError, TypeError, AttributeError, IndexError) as err:
            raise ValueError(f"{found[kind]} does not have the structure qnpu writes ({type(err).__name__}: "
                             f"{err}); was it edited or written by another version?") from None
    names = [_model_name(d) for d in data.values()]
    run["model"] = next((n for n in names if n), None)
    return run


def _model_name(data: dict):
    for model in (data.get("model"), (data.get("efficiency") or {}).get("model"), data.get("source")):
        if isinstance(model, dict) and model.get("name"):
            return model["name"]
    return None


def normalise_code(data: dict, file: Path) -> dict:
    """A code benchmark's ``summary.json`` (``data``, read from ``file``) as the comparison keeps it."""
    modes = _need(data, file, "modes")
    out = {"task": _need(data, file, "task"), "problems": data.get("problems"),
           "reference_ppl": (data.get("reference") or {}).get("ppl"), "modes": {}}
    for name, m in modes.items():
        lengths = _need(m, file, "length_tokens")
        out["modes"][name] = {"pass_at_1": _need(m, file, "pass_at_k").get("1"),
                              "repetition_rate": m.get("repetition_rate"), "hit_limit_rate": m.get("hit_limit_rate"),
                              "problems_scored": m.get("problems_scored"), "samples": m.get("samples"),
                              "length_tokens": {k: lengths.get(k) for k in ("count", "mean", "median", "p90", "max")},
                              "histogram": lengths.get("histogram") or {"edges": [], "counts": []}}
    return out


def _perplexity(data: dict, file: Path) -> dict:
    slices = {name: row for name, row in _need(data, file, "perplexity").items()}
    if data.get("text"):
        slices["text"] = data["text"]
    low = data.get("lowered") or {}
    for name, row in (low.get("perplexity") or {}).items():
        slices[f"{name} (lowered {low.get('target')})"] = row
    if low.get("text"):
        slices[f"text (lowered {low.get('target')})"] = low["text"]
    return {"source": str(file), "ppl": {k: v.get("ppl") for k, v in slices.items()},
            "tokens": {k: v.get("tokens", v.get("n_predictions")) for k, v in slices.items()}}


def _checkpoint(meta: dict, file: Path) -> dict:
    report = (meta.get("extra") or {}).get("report") or {}
    rows = report.get("linear_errors")
    complete = rows is not None
    if rows is None:  # checkpoints written before every linear's error was kept: the five worst
        rows = sorted(report.get("worst_layers") or [], key=lambda r: _model_order(r["layer"]))
    out = {"recipe": report.get("recipe") or (meta.get("recipe") or {}).get("name"),
           "layers": [r["layer"] for r in rows], "errors": [r["relative_output_error"] for r in rows],
           "complete": complete, "error_sample_tokens": report.get("error_sample_tokens")}
    if report.get("quantized"):
        out["perplexity"] = {"source": f"{file} (quantize report)",
                             "ppl": {k: v.get("ppl") for k, v in report["quantized"].items()},
                             "tokens": {k: v.get("tokens") for k, v in report["quantized"].items()}}
    return out


def _model_order(label: str) -> tuple:
    """Sort key of a linear's label in model order: block index, then the linear's place in the
    families' structure tables (q, k, v, o, gate, up, down)."""
    match = re.search(r"\.(\d+)\.(.+)$", label)
    if match is None:
        return (math.inf, math.inf, label)
    order = list(dict.fromkeys(path for family in FAMILIES for path in family.linears))
    inner = match.group(2)
    return (int(match.group(1)), order.index(inner) if inner in order else len(order), inner)


def _efficiency(data: dict, file: Path) -> dict:
    eff = _need(data, file, "efficiency")
    wb = eff.get("weight_bytes") or {}
    prefill = {f"b{r['batch']} x {r['prompt_len']}": r for r in _need(eff, file, "prefill")}
    decode = {f"b{r['batch']} x {r['prompt_len']} +{r['new_tokens']}": r for r in _need(eff, file, "decode")}
    return {"setup": {k: eff.get(k) for k in ("device", "dtype", "threads", "torch", "warmup", "repeats")}
            | {"kind": (eff.get("model") or {}).get("kind")},
            "prefill_ms": {k: r.get("median_ms") for k, r in prefill.items()},
            "prefill_tokens_per_s": {k: r.get("tokens_per_s") for k, r in prefill.items()},
            "decode_ms_per_token": {k: r.get("median_ms_per_token") for k, r in decode.items()},
            "decode_tokens_per_s": {k: r.get("tokens_per_s") for k, r in decode.items()},
            "memory": {"linear_weight_bytes": wb.get("linear"), "total_weight_bytes": wb.get("total"),
                       "peak_memory_bytes": eff.get("peak_memory_bytes")},
            "peak_memory_source": eff.get("peak_memory_source")}


def check_labels(labels: str | None, count: int) -> list[str | None]:
    """``--labels a,b,c``: one non-empty label per run (None: labels from folder names). Runs given
    the same label are one model's results from several folders (`merge_runs`)."""
    if labels is None:
        return [None] * count
    names = [s.strip() for s in labels.split(",")]
    if len(names) != count or not all(names):
        raise ValueError(f"--labels {labels!r} gives {len(names)} label(s) for {count} run(s); give one per RUN, "
                         "comma-separated, none empty")
    if any("|" in name for name in names):
        raise ValueError(f"--labels {labels!r}: a label may not hold '|' (it separates markdown table cells)")
    return names


KINDS = ("code", "perplexity", "efficiency", "checkpoint")


def merge_runs(runs: list[dict]) -> list[dict]:
    """One run per label, in first-seen order: folder-named runs of the same name are told apart
    (``name-2``); runs labelled alike (``--labels``) are merged, each kind of result from the one run
    holding it (two holding it is an error). Then a run without ``eval.json`` takes its checkpoint's
    quantized perplexity."""
    seen: dict[str, int] = {}
    for run in runs:
        if not run["named"]:
            seen[run["label"]] = seen.get(run["label"], 0) + 1
            if seen[run["label"]] > 1:
                run["label"] = f"{run['label']}-{seen[run['label']]}"
    merged: dict[str, dict] = {}
    for run in runs:
        into = merged.setdefault(run["label"], {**run, "sources": {}, **dict.fromkeys(KINDS)})
        if into["path"] != run["path"]:
            into["path"] = f"{into['path']}, {run['path']}"
        for kind in KINDS:
            if run[kind] is None:
                continue
            if into[kind] is not None:
                raise ValueError(f"two runs labelled {run['label']} hold {FILES[kind]} ({into['sources'][kind]}, "
                                 f"{run['sources'][kind]}); give them different --labels")
            into[kind], into["sources"][kind] = run[kind], run["sources"][kind]
        into["model"] = into["model"] or run["model"]
    for run in merged.values():
        from_checkpoint = (run["checkpoint"] or {}).pop("perplexity", None)
        run["perplexity"] = run["perplexity"] or from_checkpoint
    return list(merged.values())


def _keys(maps) -> list[str]:
    return list(dict.fromkeys(k for m in maps for k in m))


def compare(runs: list[dict]) -> dict:
    """The comparison of loaded runs (`load_run`, merged by `merge_runs`): one JSON-ready dict,
    values by run label."""
    runs = merge_runs(runs)
    out: dict = {"runs": [{k: r[k] for k in ("label", "path", "model", "sources")} for r in runs],
                 "code": {}, "perplexity": None, "efficiency": None, "layer_errors": {}, "omitted": []}
    for task in dict.fromkeys(r["code"]["task"] for r in runs if r["code"]):
        have = [r for r in runs if r["code"] and r["code"]["task"] == task]
        modes = _keys(r["code"]["modes"] for r in have)
        section = {"baseline": have[0]["label"], "modes": modes,
                   "reference_ppl": {r["label"]: r["code"]["reference_ppl"] for r in have},
                   "problems": {r["label"]: r["code"]["problems"] for r in have}}
        for key in ("pass_at_1", "repetition_rate", "hit_limit_rate", "length_tokens", "histogram"):
            section[key] = {r["label"]: {m: r["code"]["modes"][m][key] for m in modes if m in r["code"]["modes"]}
                            for r in have}
        out["code"][task] = section
    have = [r for r in runs if r["perplexity"]]
    if have:
        out["perplexity"] = {"baseline": have[0]["label"], "slices": _keys(r["perplexity"]["ppl"] for r in have),
                             **{key: {r["label"]: r["perplexity"][key] for r in have}
                                for key in ("ppl", "tokens", "source")}}
    have = [r for r in runs if r["efficiency"]]
    if have:
        eff = {"baseline": have[0]["label"]}
        for key in ("prefill_ms", "prefill_tokens_per_s", "decode_ms_per_token", "decode_tokens_per_s", "memory",
                    "setup", "peak_memory_source"):
            eff[key] = {r["label"]: r["efficiency"][key] for r in have}
        eff["prefill_shapes"] = _keys(eff["prefill_ms"].values())
        eff["decode_shapes"] = _keys(eff["decode_ms_per_token"].values())
        out["efficiency"] = eff
    for r in runs:
        if r["checkpoint"] is not None:
            out["layer_errors"][r["label"]] = {k: v for k, v in r["checkpoint"].items() if k != "perplexity"}
    if not out["code"]:
        out["omitted"].append("code benchmarks: no run holds a summary.json (qnpu eval --task humaneval|mbpp)")
    if out["perplexity"] is None:
        out["omitted"].append("perplexity: no run holds an eval.json (qnpu eval --output DIR) or a checkpoint "
                              "with quantized perplexity")
    if out["efficiency"] is None:
        out["omitted"].append("efficiency: no run holds an efficiency.json (qnpu eval --efficiency)")
    if not out["layer_errors"]:
        out["omitted"].append("per-layer error: no run is a qnpu checkpoint (qnpu.json)")
    return out
