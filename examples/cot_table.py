"""The first source paper's table: a model in floating point, W8A8, W4A8, W4A8 + SmoothQuant and
W4A8 + Hadamard rotation, each judged on HumanEval in the three chain-of-thought modes (pass@1, the
reference solutions' conditional perplexity, answer length, repetition-failure rate) and for
efficiency (prefill latency, decode speed, peak memory, weight bytes).

    python examples/cot_table.py --model PATH [--settings fp,w8a8-dynamic,w4a8] [--limit 164] [--output DIR]

A setting is ``fp`` or a built-in recipe name (``qnpu recipes``). Each quantized setting is made
with ``qnpu quantize`` (``--samples`` x ``--seq-len`` calibration tokens), evaluated with
``qnpu eval --task humaneval --cot ...`` and ``qnpu eval --efficiency`` (with ``--lowered TARGET``
the efficiency of the model lowered to integer ops for that target: ``ascend`` on an Atlas A2 with
torch_npu, ``reference`` anywhere), and ``qnpu report`` draws the comparison plots. Results:
``<output>/cot_table.json`` (rewritten after every step: rerunning resumes), ``cot_table.md`` and
``report/``. With ``--model`` an openPangu-Embedded-1B/7B folder on an Atlas A2 this is the paper's
setting; on the default 135M model on a CPU pass@1 is near 0 and a simulated quantized model is
slower than the float one (fake quantization adds work): the table then says so rather than
showing a speed-up.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common import Results, csv, qnpu_cli

from qnpu.eval.code import COT_MODES
from qnpu.jobs import eval_code_job, quantize_job
from qnpu.transforms import recipes

DEFAULT_SETTINGS = "fp,w8a8-dynamic,w4a8,w4a8-smoothquant,w4a8-hadamard"


def make_model(args, setting: str, folder: Path) -> str:
    """The path (or 'default') of the setting's model: the source itself for ``fp``."""
    if setting == "fp":
        return args.model
    ckpt = folder / f"ckpt-{setting}"
    if not (ckpt / "qnpu.json").is_file():
        quantize_job(model=None if args.model == "default" else args.model, recipe=setting, samples=args.samples,
                     seq_len=args.seq_len, seed=args.seed, evaluate_baseline=False, evaluate_result=False,
                     output=str(ckpt), overwrite_any=True, progress=not args.quiet)
    return str(ckpt)


def code_eval(args, model: str, out: Path) -> dict:
    summary = eval_code_job(task="humaneval", model=None if model == "default" else model, cot=args.modes,
                            limit=args.limit, max_new_tokens=args.max_new_tokens, output=str(out),
                            progress=not args.quiet)
    modes = {}
    for mode, m in summary["modes"].items():
        modes[mode] = {"pass@1": m["pass_at_k"].get("1"), "answer_tokens_mean": m["length_tokens"]["mean"],
                       "answer_words_mean": m["length_words"]["mean"], "repetition_rate": m["repetition_rate"],
                       "hit_limit_rate": m["hit_limit_rate"], "cot_applied": m["cot_applied"]}
    return {"reference_ppl": summary["reference"]["ppl"], "modes": modes, "folder": str(out)}


def efficiency(args, model: str, out: Path) -> dict:
    extra = ["--lowered", args.lowered] if args.lowered and model != args.model else []
    data = qnpu_cli("eval", *([] if model == "default" else [model]), "--efficiency", "--batch-sizes",
                    args.batch_sizes, "--prompt-lens", args.prompt_lens, "--decode-tokens", str(args.decode_tokens),
                    "--output", str(out), *extra)
    eff = data.get("efficiency", data)
    first = eff["prefill"][0]
    return {"prefill_ms": first["median_ms"], "prefill_at": f"batch {first['batch']} x {first['prompt_len']}",
            "decode_tokens_per_s": eff["decode"][0]["tokens_per_s"] if eff.get("decode") else None,
            "peak_memory_bytes": eff.get("peak_memory_bytes"), "memory_source": eff.get("peak_memory_source"),
            "weight_bytes": eff["weight_bytes"]["linear"], "kind": eff["model"]["kind"], "folder": str(out)}


def ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def num(value, digits=3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(data: dict, settings: list[str]) -> str:
    cells, setup = data["cells"], data["setup"]
    fp_eff = cells.get("fp/efficiency", {})
    lines = [f"# CoT table: {setup['model']}", "",
             f"HumanEval, first {setup['limit'] or 164} problems, greedy, at most {setup['max_new_tokens']} new "
             f"tokens; calibration {setup['samples']} x {setup['seq_len']}; efficiency: median prefill at "
             f"{fp_eff.get('prefill_at', '?')}, {data['env']}.", "",
             "| setting | mode | pass@1 | ref ppl | answer tokens | repetition rate | prefill ms | prefill speed-up "
             "| peak MiB | weight MiB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in settings:
        code, eff = cells.get(f"{s}/code", {}), cells.get(f"{s}/efficiency", {})
        for mode, m in code.get("modes", {}).items():
            mem = eff.get("peak_memory_bytes")
            lines.append(
                f"| {s} | {mode} | {num(m['pass@1'])} | {num(code.get('reference_ppl'))} | "
                f"{num(m['answer_tokens_mean'], 1)} | {num(m['repetition_rate'])} | {num(eff.get('prefill_ms'), 1)} | "
                f"{num(ratio(fp_eff.get('prefill_ms'), eff.get('prefill_ms')), 2)} | "
                f"{num(mem / 2**20 if mem else None, 0)} | {num(eff['weight_bytes'] / 2**20 if eff.get('weight_bytes') else None, 1)} |")
    failed = [f"- {k}: {c['error']}" for k, c in cells.items() if "error" in c]
    kinds = sorted({c["kind"] for k, c in cells.items() if k.endswith("/efficiency") and "kind" in c})
    lines += ["", f"Efficiency measured on: {', '.join(kinds) or '-'}."]
    return "\n".join(lines + (["", "Failed steps:", *failed] if failed else [])) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default", help="HF folder or 'default'")
    parser.add_argument("--settings", default=DEFAULT_SETTINGS, help="fp and/or built-in recipe names")
    parser.add_argument("--modes", default=",".join(COT_MODES), help="CoT modes (comma-separated)")
    parser.add_argument("--limit", type=int, default=None, help="first N HumanEval problems (default all 164)")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-sizes", default="1")
    parser.add_argument("--prompt-lens", default="128,512")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--lowered", default=None, help="measure efficiency of the lowered model (reference | ascend)")
    parser.add_argument("--output", default="qnpu-out/cot-table")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    settings = csv(args.settings)
    bad = [s for s in settings if s != "fp" and s not in recipes.names()]
    if bad:
        raise SystemExit(f"error: unknown setting(s) {', '.join(bad)}; allowed: fp, {', '.join(recipes.names())}")
    folder = Path(args.output)
    setup = {k: getattr(args, k) for k in ("model", "modes", "limit", "max_new_tokens", "samples", "seq_len", "seed",
                                           "batch_sizes", "prompt_lens", "decode_tokens", "lowered")}
    results = Results(folder, "cot_table", setup)
    for s in settings:
        try:
            model = make_model(args, s, folder)
        except Exception as err:  # noqa: BLE001 - a failed setting must not lose the others
            results.put(f"{s}/code", {"error": f"quantize: {type(err).__name__}: {err}"})
            continue
        for step, run in (("code", code_eval), ("efficiency", efficiency)):
            key = f"{s}/{step}"
            if key in results:
                continue
            print(f"{key} ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            try:
                row = run(args, model, folder / f"{step}-{s}")
                results.put(key, {**row, "seconds": round(time.perf_counter() - start, 1)})
            except Exception as err:  # noqa: BLE001
                results.put(key, {"error": f"{type(err).__name__}: {err}"})
                print(f"{key} failed: {err}", file=sys.stderr)
    runs = [str(folder / f"{step}-{s}") for s in settings for step in ("code", "efficiency")
            if f"{s}/{step}" in results]
    labels = [s for s in settings for step in ("code", "efficiency") if f"{s}/{step}" in results]
    if runs:
        try:
            qnpu_cli("report", *runs, "--labels", ",".join(labels), "--output", str(folder / "report"))
        except Exception as err:  # noqa: BLE001 - the table below still stands without the plots
            print(f"report failed: {err}", file=sys.stderr)
    (folder / "cot_table.md").write_text(markdown(results.data, settings))
    print((folder / "cot_table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
