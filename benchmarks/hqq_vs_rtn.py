"""HQQ zero points vs round-to-nearest on the default model: lp weight error and perplexity.

``weights``: every decoder linear of the default model at uint4, groups of ``--group-size``, float
zero points, the scale fixed at the min-max range: the lp error (``p = 0.7``, HQQ's objective,
`qnpu.transforms.hqq.lp_errors`) of RTN's zero points and of HQQ's, summed per linear kind, and
the share of groups HQQ improves (it never worsens one). No forward pass.

``model``: one ``qnpu quantize --group-size G --json`` subprocess per recipe (default eval
settings unless ``--eval-tokens``), the checkpoint written to a temporary folder and removed:

* ``w4a16-rtn``: int4 symmetric, full [-8, 7] grid, round-to-nearest (the built-in RTN recipe);
* ``rtn-asym-float``: the grid HQQ starts from, uint4 asymmetric min-max with float zero points, RTN
  (a recipe file, so the gain of HQQ over its own start shows apart from that of the asymmetric grid);
* ``w4a16-hqq``: that grid with HQQ's zero points, and its reference lowering (``--lowered
  reference``: W4A16 with a float antiquant_offset).

Each run's report is kept under ``--runs`` (a run already there is not repeated).

Usage (from the repository root; one thread, as the results were measured)::

    OMP_NUM_THREADS=1 python benchmarks/hqq_vs_rtn.py weights|model [--group-size 64] [--eval-tokens N]
        [--runs DIR]

The script is not called ``hqq.py``: its folder comes first on ``sys.path``, and transformers takes
a module named ``hqq`` for the HQQ library and fails to load any model. Writes
``benchmarks/results/hqq_<part>.json`` and ``.md``; prints the JSON to stdout and the
markdown table to stderr. The 1-minute load average is recorded (the machine may be shared).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from qnpu.qcore import QSpec, choose_qparams, quantize  # noqa: E402
from qnpu.transforms import chain, quant_specs, recipe_to_dict, rtn  # noqa: E402
from qnpu.transforms.hqq import hqq_zero_points, lp_errors  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def uint4(group: int) -> QSpec:
    return QSpec(bits=4, format="uint", symmetric=False, zero_point_domain="float", granularity="group",
                 group_size=group, axis=-1)


def weights(group: int) -> tuple[dict, str]:
    from qnpu.models import load

    model, _, _ = load(None, progress=False)
    spec = uint4(group)
    sums = {k: {"rtn": 0.0, "hqq": 0.0, "groups": 0, "improved": 0, "worse": 0, "steps": []} for k in KINDS}
    for name, m in model.named_modules():
        kind = name.rsplit(".", 1)[-1]
        if kind not in sums or ".layers." not in f".{name}":
            continue
        w = m.weight.detach()
        scale, zp = choose_qparams(w, spec)
        z, _, _, steps = hqq_zero_points(w, spec, scale, zp)
        e_rtn = lp_errors(w, quantize(w, spec, scale=scale, zero_point=zp).dequantize(), spec)
        e_hqq = lp_errors(w, quantize(w, spec, scale=scale, zero_point=z).dequantize(), spec)
        row = sums[kind]
        row["rtn"] += float(e_rtn.sum())
        row["hqq"] += float(e_hqq.sum())
        row["groups"] += e_rtn.numel()
        row["improved"] += int((e_hqq < e_rtn).sum())
        row["worse"] += int((e_hqq > e_rtn).sum())
        row["steps"].append(steps)
    rows = [{"linear": k, "lp_rtn": r["rtn"], "lp_hqq": r["hqq"], "ratio": r["hqq"] / r["rtn"],
             "groups": r["groups"], "improved": r["improved"], "worse": r["worse"],
             "steps_mean": sum(r["steps"]) / len(r["steps"])} for k, r in sums.items()]
    lines = [f"| linear | lp error HQQ / RTN (p = 0.7, uint4 g{group}) | groups improved | groups worse | "
             "mean steps |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['linear']} | {r['ratio']:.4f} | {r['improved'] / r['groups']:.1%} | {r['worse']} | "
              f"{r['steps_mean']:.1f} |" for r in rows]
    return {"part": "weights", "group_size": group, "norm": 0.7, "rows": rows}, "\n".join(lines)


def _quantize(recipe: str, group: int, eval_tokens: int | None, lowered: bool, tmp: Path) -> tuple[list[str], dict]:
    shown = ["qnpu", "quantize", "--recipe", recipe]
    if not recipe.endswith(".json"):
        shown += ["--group-size", str(group)]
    if eval_tokens is not None:
        shown += ["--eval-tokens", str(eval_tokens)]
    if lowered:
        shown += ["--lowered", "reference"]
    argv = [sys.executable, "-m", "qnpu.cli", *shown[1:], "--output", str(tmp / "ckpt"), "--overwrite", "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(argv, env=env, stdout=subprocess.PIPE, text=True, check=True)
    return shown, json.loads(done.stdout)


def model(group: int, eval_tokens: int | None, runs: Path) -> tuple[dict, str]:
    runs.mkdir(parents=True, exist_ok=True)
    control = runs / f"rtn-asym-float-g{group}.json"
    control.write_text(json.dumps(recipe_to_dict(chain(quant_specs(weight=uint4(group)), rtn()))))
    plan = [("w4a16-rtn", "w4a16-rtn", False), ("rtn-asym-float", str(control), False),
            ("w4a16-hqq", "w4a16-hqq", True)]
    rows = []
    for label, recipe, lowered in plan:
        path = runs / f"{label}-g{group}-{eval_tokens or 'default'}.json"
        if not path.is_file():
            with tempfile.TemporaryDirectory() as tmp:
                shown, report = _quantize(recipe, group, eval_tokens, lowered, Path(tmp))
            path.write_text(json.dumps({"command": " ".join(shown), "report": report}, indent=1, default=str))
        run = json.loads(path.read_text())
        report = run["report"]
        row = {"recipe": label, "command": run["command"], "data_free": report["data_free"],
               "docs": report["quantized"]["docs"]["ppl"], "code": report["quantized"]["code"]["ppl"],
               "baseline_docs": report["baseline"]["docs"]["ppl"], "baseline_code": report["baseline"]["code"]["ppl"],
               "quantize_seconds": report["quantize_seconds"],
               "linear_bytes": report["weight_bytes"]["linear_weights"]}
        if "lowered" in report:
            ppl = report["lowered"]["perplexity"]
            row.update(lowered_docs=ppl["docs"]["ppl"], lowered_code=ppl["code"]["ppl"],
                       lowered_schemes=report["lowered"]["schemes"])
        rows.append(row)
    base = rows[0]
    lines = [f"Baseline (dequantized Q4_1) docs {base['baseline_docs']:.3f} / code {base['baseline_code']:.3f}; "
             f"groups of {group}.", "",
             "| recipe | docs ppl | code ppl | lowered (reference) docs / code | linear MiB | quantize s | command |",
             "|---|---:|---:|---|---:|---:|---|"]
    for r in rows:
        low = f"{r['lowered_docs']:.3f} / {r['lowered_code']:.3f}" if "lowered_docs" in r else ""
        lines.append(f"| {r['recipe']} | {r['docs']:.3f} | {r['code']:.3f} | {low} | {r['linear_bytes'] / 2**20:.1f} "
                     f"| {r['quantize_seconds']:.1f} | `{r['command']}` |")
    return {"part": "model", "group_size": group, "eval_tokens": eval_tokens, "rows": rows}, "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("weights", "model"))
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--eval-tokens", type=int, default=None, help="model: tokens per slice (default 20480)")
    parser.add_argument("--runs", type=Path, default=Path("hqq_runs"), help="model: one report per run")
    args = parser.parse_args()
    data, table = weights(args.group_size) if args.part == "weights" else \
        model(args.group_size, args.eval_tokens, args.runs)
    data.update(load_average_1m=os.getloadavg()[0], torch=torch.__version__, threads=torch.get_num_threads())
    text = json.dumps(data, indent=1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for suffix, content in ((".json", text), (".md", table)):
        (RESULTS / f"hqq_{args.part}{suffix}").write_text(content + "\n")
    print(text)
    print(table, file=sys.stderr)


if __name__ == "__main__":
    main()
