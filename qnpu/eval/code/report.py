"""``report.md``: the code benchmark's summary as a markdown page."""
from __future__ import annotations

from pathlib import Path


def _num(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _dist_row(name: str, d: dict) -> str:
    return (f"| {name} | {d['count']} | {_num(d['mean'], 1)} | {_num(d['median'], 1)} | {_num(d['p90'], 1)} | "
            f"{_num(d['max'], 0)} |")


def _histogram(d: dict) -> list[str]:
    edges, counts = d["histogram"]["edges"], d["histogram"]["counts"]
    if not counts:
        return []
    lines = ["| tokens | samples |", "|---|---|"]
    for i, count in enumerate(counts):
        lines.append(f"| {edges[i]:.0f}-{edges[i + 1]:.0f} | {count} |")
    return lines


def render(summary: dict, per_mode: dict) -> str:
    model = summary["model"].get("name", "?") if isinstance(summary["model"], dict) else summary["model"]
    gen, box, ref = summary["generation"], summary["sandbox"], summary["reference"]
    decoding = "greedy" if gen["temperature"] == 0 else \
        f"sampling, temperature {gen['temperature']}, top-p {gen['top_p']}"
    lines = [f"# {summary['task']} on {model}", "",
             f"{summary['problems']} problems from `{summary['data'].get('data', '?')}`; {gen['n']} sample(s) per "
             f"problem, {decoding}, at most {gen['max_new_tokens']} new tokens, seed {gen['seed']}.",
             f"Sandbox: {box['isolation']}; limits {', '.join(f'{k} {v}' for k, v in box['limits'].items())}.", ""]
    if summary.get("interrupted"):
        lines += ["**Interrupted**: only the finished problems are counted.", ""]
    for warning in summary.get("warnings", []):
        lines += [f"Warning: {warning}", ""]
    plots = summary["outputs"].get("plots") or []
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem.replace('_', ' ')}]({Path(p).name})" for p in plots] + [""]
    lines += ["## Reference solutions (teacher forcing)", "",
              f"Conditional perplexity of the reference solutions given their prompts: **{_num(ref['ppl'])}** "
              f"(token-weighted over {ref['tokens']} tokens of {ref['problems']} problems; "
              f"mean NLL {_num(ref['nll'], 4)} nats).", ""]
    for name, m in summary["modes"].items():
        lines += [f"## Mode: {name}", "", f"CoT switch: {m['cot_applied'] or '-'}", "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| pass@{k} | {_num(v)} |" for k, v in m["pass_at_k"].items()]
        lines += [f"| problems scored | {m['problems_scored']} of {m['problems']} |",
                  f"| repetition failures | {m['repetition_failures']} ({_num(m['repetition_rate'])}) |",
                  f"| hit the token limit | {_num(m['hit_limit_rate'])} |",
                  f"| outcomes | {', '.join(f'{k} {v}' for k, v in m['statuses'].items()) or '-'} |", "",
                  "| length | samples | mean | median | p90 | max |", "|---|---|---|---|---|---|",
                  _dist_row("tokens", m["length_tokens"]), _dist_row("words", m["length_words"]), ""]
        lines += _histogram(m["length_tokens"]) + [""]
    lines += ["## Problems", "", "| task | mode | passed | ref ppl | tokens | outcome |", "|---|---|---|---|---|---|"]
    for name, rows in per_mode.items():
        for r in rows:
            if "samples" in r:
                outcome = ", ".join(sorted({s["status"] for s in r["samples"]}))
                tokens = ", ".join(str(s["tokens"]) for s in r["samples"][:4])
                passed = f"{r['passed']}/{r['n']}"
            else:
                outcome, tokens, passed = f"error: {r['error'][:80]}", "-", "-"
            lines.append(f"| {r['task_id']} | {name} | {passed} | {_num(r['reference'].get('ppl'))} | {tokens} | "
                         f"{outcome.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def write_report(summary: dict, per_mode: dict, path: Path) -> None:
    path.write_text(render(summary, per_mode), encoding="utf-8")
