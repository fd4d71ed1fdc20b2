"""`emit`: how a benchmark script hands back its report (JSON on stdout, the markdown table on stderr,
both kept in ``benchmarks/results/`` unless the run should not replace them)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def emit(name: str, report: dict, table: str, *, write: bool = True) -> None:
    """Print ``report`` as JSON and ``table`` to stderr; with ``write``, also save them as
    ``results/<name>.json`` and ``results/<name>.md``."""
    text = json.dumps(report, indent=2)
    if write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{name}.json").write_text(text + "\n")
        (RESULTS / f"{name}.md").write_text(table)
    print(text)
    print(table, file=sys.stderr)
