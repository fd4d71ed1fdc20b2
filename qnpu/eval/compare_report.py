"""The comparison of `qnpu.eval.compare` written out: PNGs (`qnpu.eval.plots`), ``report.md`` (tables
with the plots linked by relative path) and ``comparison.json`` (the numbers, what was plotted and
the files written), in that order, so a folder with ``comparison.json`` is complete.

In the tables each value of a run after the section's baseline (the first run holding it) carries
its change: perplexity and memory in percent, pass@1 and rates as a difference, latency as the
baseline's time over the run's (a speedup). See docs/architecture.md, "Reports".
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from qnpu.eval import plots
from qnpu.eval.compare import (COMPARISON_FILE, REPORT_FILE, check_labels, compare, load_run, read_json,
                               results_folder, write_json)

MIB = 2 ** 20


def _num(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _cell(v, base, how: str, digits: int = 3) -> str:
    """``v`` and its change against ``base`` (None when ``v`` is the baseline's own value)."""
    text = _num(v, digits)
    if base is None or v is None:
        return text
    if how == "percent" and base:
        return f"{text} ({100 * (v / base - 1):+.2f}%)"
    if how == "diff":
        return f"{text} ({v - base:+.{digits}f})"
    if how == "speedup" and v:
        return f"{text} ({base / v:.2f}x)"
    return text


def _table(rows: list[str], labels: list[str], values: dict, baseline: str, how: str, first: str,
           digits: int = 3) -> list[str]:
    """Markdown rows ``rows`` x columns ``labels`` of ``values[label][row]``."""
    lines = [f"| {first} | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for row in rows:
        base = values.get(baseline, {}).get(row)
        cells = [_cell(values[lab].get(row), None if lab == baseline else base, how, digits) for lab in labels]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


def _image(plot: dict) -> list[str]:
    return [f"![{plot['title']}]({plot['file']})", ""]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "run"


def _code(task: str, s: dict, folder: Path, drawn: list) -> list[str]:
    labels = list(s["pass_at_1"])
    prefix = f"{_safe(task)}-"
    modes = {lab: {m: {"pass_at_1": s["pass_at_1"][lab][m], "repetition_rate": s["repetition_rate"][lab][m],
                       "histogram": s["histogram"][lab][m]} for m in s["pass_at_1"][lab]} for lab in labels}
    acc, rep, hist = plots.code_plots(folder, modes, prefix)
    ref = plots.grouped_bars(folder / f"{prefix}reference_ppl.png", [task],
                             {lab: [s["reference_ppl"][lab]] for lab in labels},
                             title="reference-solution perplexity (teacher forcing)", ylabel="perplexity")
    drawn += [acc, rep, hist, ref]
    lines = [f"## Code benchmark: {task}", "",
             "Problems: " + ", ".join(f"{lab} {s['problems'][lab]}" for lab in labels) + "; changes against "
             f"{s['baseline']}.", "", "### pass@1", ""]
    lines += _table(s["modes"], labels, s["pass_at_1"], s["baseline"], "diff", "mode") + [""] + _image(acc)
    lines += ["### Repetition failures (share of samples)", ""]
    lines += _table(s["modes"], labels, s["repetition_rate"], s["baseline"], "diff", "mode") + [""] + _image(rep)
    lines += ["### Answer length (tokens)", "", "| run | mode | samples | mean | median | p90 | max |",
              "|---|---|---|---|---|---|---|"]
    for lab in labels:
        for mode, d in s["length_tokens"][lab].items():
            lines.append(f"| {lab} | {mode} | {d['count']} | {_num(d['mean'], 1)} | {_num(d['median'], 1)} | "
                         f"{_num(d['p90'], 1)} | {_num(d['max'], 0)} |")
    lines += [""] + _image(hist) + ["### Reference-solution perplexity", ""]
    lines += _table([task], labels, {lab: {task: v} for lab, v in s["reference_ppl"].items()}, s["baseline"],
                    "percent", "task") + [""] + _image(ref)
    return lines


def _perplexity(p: dict, folder: Path, drawn: list) -> list[str]:
    labels = list(p["ppl"])
    plot = plots.grouped_bars(folder / "perplexity.png", p["slices"],
                              {lab: [p["ppl"][lab].get(s) for s in p["slices"]] for lab in labels},
                              title="perplexity per slice", ylabel="perplexity")
    drawn.append(plot)
    lines = ["## Perplexity", "", f"Changes against {p['baseline']}.", ""]
    lines += _table(p["slices"], labels, p["ppl"], p["baseline"], "percent", "slice") + [""]
    for s in p["slices"]:
        counts = {lab: p["tokens"][lab].get(s) for lab in labels if s in p["tokens"][lab]}
        if len(set(counts.values())) > 1:
            lines += [f"Note: slice {s} was measured on different token counts "
                      f"({', '.join(f'{lab} {n}' for lab, n in counts.items())}).", ""]
    lines += ["Sources: " + "; ".join(f"{lab} `{p['source'][lab]}`" for lab in labels), ""]
    return lines + _image(plot)


def _efficiency(e: dict, folder: Path, drawn: list) -> list[str]:
    labels, base = list(e["setup"]), e["baseline"]
    lines = ["## Efficiency", "", f"Changes against {base}: latency as a speedup (baseline time / run time), "
             "memory in percent.", "", "| run | kind | device | dtype | threads | torch |", "|---|---|---|---|---|---|"]
    for lab, st in e["setup"].items():
        lines.append(f"| {lab} | {st['kind']} | {st['device']} | {st['dtype']} | {st['threads']} | {st['torch']} |")
    lines.append("")
    if len({(st["device"], st["dtype"], st["threads"]) for st in e["setup"].values()}) > 1:
        lines += ["Warning: the runs were timed on different devices, dtypes or thread counts; their latencies "
                  "are not comparable.", ""]
    for key, shapes, title, unit in (("prefill_ms", "prefill_shapes", "prefill latency", "median ms"),
                                     ("decode_ms_per_token", "decode_shapes", "decode latency", "median ms per token")):
        plot = plots.grouped_bars(folder / f"{key}.png", e[shapes],
                                  {lab: [e[key][lab].get(s) for s in e[shapes]] for lab in labels},
                                  title=f"{title} (batch x prompt length)", ylabel=unit)
        drawn.append(plot)
        lines += [f"### {title[0].upper()}{title[1:]} ({unit})", ""]
        lines += _table(e[shapes], labels, e[key], base, "speedup", "shape", 2) + [""] + _image(plot)
    rows = {"linear weights": "linear_weight_bytes", "total weights": "total_weight_bytes",
            "peak memory": "peak_memory_bytes"}
    mib = {lab: {row: None if e["memory"][lab][k] is None else e["memory"][lab][k] / MIB for row, k in rows.items()}
           for lab in labels}
    plot = plots.grouped_bars(folder / "memory.png", list(rows), {lab: list(mib[lab].values()) for lab in labels},
                              title="memory", ylabel="MiB")
    drawn.append(plot)
    lines += ["### Memory (MiB)", ""] + _table(list(rows), labels, mib, base, "percent", "what", 1) + [""]
    sources = {lab: src for lab, src in e["peak_memory_source"].items() if src}
    if sources:
        lines += ["Peak memory: " + "; ".join(f"{lab} {src}" for lab, src in sources.items()), ""]
    return lines + _image(plot)


def _layers(errors: dict, folder: Path, drawn: list) -> list[str]:
    lines = ["## Per-layer error", "", "Relative output error of each quantized linear on the checkpoint's error "
             "sample (`qnpu quantize`), in model order.", ""]
    used: set[str] = set()
    for lab, c in errors.items():
        name = f"layer_errors-{_safe(lab)}"
        while name in used:
            name += "_"
        used.add(name)
        plot = plots.layer_bars(folder / f"{name}.png", c["layers"], c["errors"],
                                title=f"{lab}: relative output error per linear")
        drawn.append(plot)
        lines += [f"### {lab}" + (f" (recipe {c['recipe']})" if c["recipe"] else ""), ""]
        if not c["layers"]:
            lines += ["The checkpoint records no per-linear error.", ""]
            continue
        known = [(e, layer) for e, layer in zip(c["errors"], c["layers"]) if e is not None]
        if known:
            worst = max(known)
            lines += [f"{len(c['layers'])} linears; mean {sum(e for e, _ in known) / len(known):.4f}, "
                      f"largest {worst[0]:.4f} ({worst[1]}).", ""]
        if not c["complete"]:
            lines += [f"Only the {len(c['layers'])} worst linears are recorded in this checkpoint (written before "
                      "every linear's error was kept).", ""]
        lines += _image(plot)
    return lines


def render(comparison: dict, folder: Path) -> tuple[str, list[dict]]:
    """``report.md``'s text and the plots it links (written into ``folder``)."""
    drawn: list[dict] = []
    runs = comparison["runs"]
    lines = [f"# Comparison: {', '.join(r['label'] for r in runs)}", "", "| run | model | folder | holds |",
             "|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['label']} | {r['model'] or '-'} | `{r['path']}` | {', '.join(sorted(r['sources']))} |")
    lines.append("")
    for task, section in comparison["code"].items():
        lines += _code(task, section, folder, drawn)
    if comparison["perplexity"]:
        lines += _perplexity(comparison["perplexity"], folder, drawn)
    if comparison["efficiency"]:
        lines += _efficiency(comparison["efficiency"], folder, drawn)
    if comparison["layer_errors"]:
        lines += _layers(comparison["layer_errors"], folder, drawn)
    if comparison["omitted"]:
        lines += ["## Not in these runs", ""] + [f"- {line}" for line in comparison["omitted"]] + [""]
    return "\n".join(lines), drawn


def prepare_output(output: str | os.PathLike) -> Path:
    """A new or empty folder, or an earlier report's (whose files are removed first); anything else
    (a file, a folder holding other things, such as a run) is refused."""
    folder = Path(output)
    if folder.is_dir() and next(folder.iterdir(), None) is not None:
        if not (folder / COMPARISON_FILE).is_file():
            raise ValueError(f"--output {folder} holds files that are not a qnpu report (no {COMPARISON_FILE}); "
                             "give a new or empty folder")
        for name in read_json(folder / COMPARISON_FILE).get("files", []):
            if isinstance(name, str) and Path(name).name == name and (folder / name).is_file():
                (folder / name).unlink()
    return results_folder(folder)


def report_job(runs: list[str], output: str | os.PathLike, labels: str | None = None) -> dict:
    """Load ``runs`` (checked first, before anything is written), compare them and write the report
    into ``output``; returns the comparison with ``output`` and ``files`` added."""
    if not runs:
        raise ValueError("give at least one RUN folder")
    loaded = [load_run(path, label) for path, label in zip(runs, check_labels(labels, len(runs)))]
    comparison = compare(loaded)
    folder = prepare_output(output)
    text, drawn = render(comparison, folder)
    (folder / REPORT_FILE).write_text(text, encoding="utf-8")
    comparison["plots"] = drawn
    comparison["files"] = [p["file"] for p in drawn] + [REPORT_FILE, COMPARISON_FILE]
    comparison["output"] = str(folder)
    write_json(folder / COMPARISON_FILE, comparison)
    return comparison
