"""The main jobs behind the CLI: quantize a model end to end with a report, and evaluate one.

`quantize_job` checks its arguments (recipe, device, counts, --seq-len against the model's
config.json, an output folder it can create and may replace) before any work, loads a model,
measures baseline perplexity, calibrates and quantizes it block by block with a recipe, measures
the quantized perplexity and saves the checkpoint with the report (atomically). Everything it
prints is also returned as a JSON-ready dict.
"""
from __future__ import annotations

import contextlib
import difflib
import errno
import json
import os
import sys
import time
from pathlib import Path

import torch

from qnpu.data import slice_names
from qnpu.eval import WINDOW, tokenize_slice
from qnpu.eval.baseline_cache import cached_baseline, model_identity
from qnpu.eval.efficiency import EfficiencyGrid, measure_efficiency, model_kind, write_results
from qnpu.eval.footprint import weight_bytes as footprint_bytes
from qnpu.eval.code import GenerationConfig, Limits, check_cot, load_problems, run_code_eval
from qnpu.eval.compare import EVAL_FILE, results_folder, write_json
from qnpu.eval.perplexity import timed_perplexity
from qnpu.eval.text import read_texts, text_files, text_perplexity
from qnpu.lowering import FORMATS, check_target, export, lower, plan, scheme_counts
from qnpu.lowering.exports import is_export
from qnpu.models import CheckpointWriter, load, quantize_model, save_quantized
from qnpu.models.default import default_cache_dir, load_default_tokenizer
from qnpu.models.devices import resolve_device
from qnpu.models.lazy import quantize_from_disk
from qnpu.models.loading import DEFAULT_NAMES, default_source, folder_source
from qnpu.qcore.outputs import recover, sibling
from qnpu.transforms import QTransform, recipe_to_dict, recipes

EVAL_SLICES = ("docs", "code")


def resolve_recipe(name_or_file: str, group_size: int | None = None) -> QTransform:
    """A built-in recipe name, or a JSON/YAML recipe file."""
    if name_or_file.endswith((".json", ".yaml", ".yml")) or Path(name_or_file).is_file():
        if group_size is not None:
            raise ValueError("--group-size applies to built-in recipes; put the group size in the recipe file")
        return recipes.load(name_or_file)
    return recipes.get(name_or_file, group_size=group_size)


def check_counts(*, samples: int | None = None, seq_len: int | None = None, batch_size: int | None = None,
                 eval_tokens: int | None = None) -> None:
    """Refuse, naming the CLI flag, a count that would fail once the model is loaded (None: not given)."""
    limits = (("--samples", samples, 1, ""), ("--seq-len", seq_len, 2, " (a sequence of n tokens gives n - 1 "
                                                                            "predictions)"),
              ("--batch-size", batch_size, 1, ""),
              ("--eval-tokens", eval_tokens, WINDOW, f" (perplexity is measured over windows of {WINDOW} tokens)"))
    for flag, value, least, why in limits:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise ValueError(f"{flag} {value} is invalid; allowed: an integer >= {least}{why}")


def check_not_quantized(model: str | None) -> None:
    """Refuse to quantize a qnpu checkpoint (a folder with ``qnpu.json``) again: its weights are
    already rounded onto a grid, and quantizing them once more compounds the error of both recipes."""
    meta_file = Path(model) / "qnpu.json" if model not in DEFAULT_NAMES else None
    if meta_file is None or not meta_file.is_file():
        return
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError):
        meta = {}
    meta = meta if isinstance(meta, dict) else {}
    report = (meta.get("extra") or {}).get("report") or {}
    source = meta.get("source") or {}
    recipe = f" (quantized by recipe {report['recipe']})" if report.get("recipe") else ""
    original = "default" if source.get("kind") == "default" else source.get("path") or source.get("name")
    instead = f": --model {original}" if original else ""
    raise ValueError(f"--model {model} is already a qnpu checkpoint{recipe}; quantizing it again would "
                     f"quantize its rounded weights: quantize the original model instead{instead}")


def check_seq_len(model: str | None, seq_len: int) -> None:
    """Refuse a ``seq_len`` above the model's ``max_position_embeddings``, read from its config.json
    without loading weights (not checked where there is no config.json: a .gguf file, or the default
    model before its cache is built)."""
    config = (default_cache_dir() if model in DEFAULT_NAMES else Path(model)) / "config.json"
    try:
        limit = json.loads(config.read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):  # absent or unreadable: loading names the problem
        return
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < seq_len:
        raise ValueError(f"--seq-len {seq_len} is above the model's maximum positions (max_position_embeddings "
                         f"{limit} in {config}); use --seq-len {limit} or less")


def check_output_folder(output: str | os.PathLike, overwrite: bool, *, overwrite_any: bool = False,
                        inputs: dict[str, str | os.PathLike] | None = None, progress: bool = True) -> None:
    """Refuse, before any work, an output folder that cannot be written or must not be replaced
    (after cleaning what killed runs left beside it, `qnpu.qcore.outputs.recover`: an old output
    moved aside and not put back is restored first, said on stderr unless not ``progress``):

    * one of ``inputs`` (``{"--model": path}``: what the job reads), one inside it or one holding
      it, whatever the flags;
    * an existing path without ``overwrite``, and with it anything qnpu did not write (a qnpu
      checkpoint with ``qnpu.json``, a qnpu export, an empty folder may be replaced): a model
      folder, unrelated files or a regular file need ``overwrite_any`` (``--overwrite-any``);
    * a path that cannot be created: its ``<name>.partial-<pid>`` folder, where checkpoints and
      exports are first written, is created and removed again, with any parent folders created for it."""
    path = Path(output)
    overwrite = overwrite or overwrite_any
    for what, source in (inputs or {}).items():
        _check_apart(path, what, Path(source))
    for line in recover(path):
        if progress:
            print(f"qnpu: {line}", file=sys.stderr)
    if os.path.lexists(path):
        if not overwrite:
            raise FileExistsError(f"output folder {output} exists; choose another (--output) or replace it "
                                  "(--overwrite)")
        if not overwrite_any:
            _check_replaceable(path)
    if not path.name:
        raise ValueError(f"--output {output} names no folder; give a folder name")
    probe = sibling(path, "partial")
    try:
        existing = next(p for p in probe.parents if p.exists())
        made = not probe.exists()
        probe.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        hint = ""
        if err.errno == errno.ENAMETOOLONG:
            hint = (f"; the name must leave room for the '.partial-<pid>' suffix the folder is first written "
                    f"under: use at most {_name_max(path.parent) - len('.partial-') - 7} characters")
        raise ValueError(f"--output {output} cannot be created ({err.strerror or err}: {err.filename}){hint}; "
                         "choose another --output") from None
    if made:
        with contextlib.suppress(OSError):  # (a folder something else wrote into meanwhile stays)
            probe.rmdir()
            for parent in probe.parents:
                if parent == existing:
                    break
                parent.rmdir()


def _check_apart(output: Path, what: str, source: Path) -> None:
    """Refuse an output that is ``source`` (compared resolved: symlinks, ``..``), lies inside it or holds it."""
    out, src = output.resolve(), source.resolve()
    if out == src:
        raise ValueError(f"--output {output} is {what} {source} itself: writing there would replace what qnpu "
                         "reads; choose another --output")
    if out.is_relative_to(src):
        raise ValueError(f"--output {output} is inside {what} {source}; choose an --output outside it")
    if src.is_relative_to(out):
        raise ValueError(f"--output {output} holds {what} {source}: replacing it would delete it; choose another "
                         "--output")


def _check_replaceable(path: Path) -> None:
    """Refuse to replace (``--overwrite``) what qnpu did not write: only a qnpu checkpoint, a qnpu export
    or an empty folder may be replaced."""
    if path.is_dir():
        if (path / "qnpu.json").is_file() or is_export(path) or next(path.iterdir(), None) is None:
            return
        what = "a folder without qnpu.json, and not a qnpu export"
    else:
        what = "a file" if path.is_file() else "not a folder"
    raise FileExistsError(f"--output {path} exists and is not a qnpu checkpoint or export ({what}); --overwrite "
                          "replaces only those: choose another --output, or pass --overwrite-any to replace it anyway")


def _name_max(folder: Path) -> int:
    for candidate in (folder, *folder.parents):
        try:
            return os.pathconf(candidate, "PC_NAME_MAX")
        except (OSError, ValueError):
            continue
    return 255


def check_slices(slices) -> None:
    """Refuse unknown evaluation slices (``--slices``) before anything is loaded."""
    known = slice_names()
    for name in slices:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ValueError(f"--slices: unknown slice {name!r}; {hint}allowed: {', '.join(known)}")


def calibration_ids(tokenizer, samples: int, seq_len: int, seed: int | None = None) -> torch.Tensor:
    """``[samples, seq_len]`` token ids from the calibration slice: the first ``samples`` chunks
    (the shared protocol) or, with a ``seed``, chunks at seeded random offsets."""
    check_counts(samples=samples, seq_len=seq_len)
    ids = tokenize_slice(tokenizer, "calibration", "all")
    need = samples * seq_len
    if ids.numel() < need:
        raise ValueError(f"the calibration text has {ids.numel()} tokens, fewer than samples x seq_len = "
                         f"{samples} x {seq_len} = {need}; lower --samples or --seq-len")
    if seed is None:
        return ids[:need].view(samples, seq_len).clone()
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (samples,), generator=g)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def evaluate(model, tokenizer, slices=EVAL_SLICES, n_tokens: int | None = None, progress: bool = True) -> dict:
    """Perplexity on each evaluation slice (windows of 512)."""
    return {name: timed_perplexity(model, tokenize_slice(tokenizer, name, n_tokens), progress=progress)
            for name in slices}


def weight_bytes(model) -> dict:
    """Bytes of the linears' weights as stored (packed codes + scales for quantized ones) and in float
    (`qnpu.eval.footprint.weight_bytes`, under the quantize report's names)."""
    sizes = footprint_bytes(model)
    quantized, float_equiv = sizes["linear"], sizes["linear_float"]
    return {"linear_weights": quantized, "linear_weights_float": float_equiv,
            "compression": round(float_equiv / quantized, 3) if quantized else None}


def resolve_forward_dtype(name: str | None):
    """``--forward-dtype``: None / "float32" (the model's own dtype) or "bfloat16" (autocast)."""
    choices = {None: None, "float32": None, "bfloat16": torch.bfloat16}
    if name not in choices:
        raise ValueError(f"forward dtype {name!r}; allowed: float32 | bfloat16")
    return choices[name]


def quantize_job(*, model: str | None = None, recipe: str = "w8a8-dynamic", group_size: int | None = None,
                 samples: int = 128, seq_len: int = 512, seed: int | None = None, device: str = "cpu",
                 output: str | None = None, eval_tokens: int | None = None, evaluate_baseline: bool = True,
                 evaluate_result: bool = True, overwrite: bool = False, progress: bool = True,
                 batch_size: int = 8, stream: bool = False, lowered: str | None = None,
                 overwrite_any: bool = False, baseline_cache: bool = True,
                 true_sequential: bool | None = None, forward_dtype: str | None = None) -> dict:
    """Quantize ``model`` with ``recipe`` and report baseline vs quantized perplexity, weight bytes,
    wall time and the five linears with the largest output error.

    The baseline perplexity comes from `qnpu.eval.baseline_cache` when an earlier run measured it on
    the same model, slice and tokens (``baseline_cache=False``: measured, and not stored).

    ``stream=True`` never holds the whole model: blocks are read one at a time from the folder's
    safetensors (`quantize_from_disk`) and written straight into the checkpoint at ``output``;
    there is no perplexity then (run `eval_job` on the checkpoint where it fits in memory).

    ``lowered="reference"`` also lowers the quantized model to integer ops (`qnpu.lowering.lower`)
    and reports its perplexity beside the simulated one; the target is checked before any work and
    the layers' schemes right after quantization, before anything is evaluated or saved."""
    start = time.perf_counter()
    transform = resolve_recipe(recipe, group_size)
    resolve_device(device)
    autocast = resolve_forward_dtype(forward_dtype)
    if lowered is not None:
        if stream:
            raise ValueError("--lowered needs the whole quantized model in memory; drop --stream (or run "
                             "`qnpu eval CHECKPOINT --lowered ...` on the streamed checkpoint)")
        check_target(lowered)
    check_not_quantized(model)
    check_counts(samples=samples, seq_len=seq_len, batch_size=batch_size, eval_tokens=eval_tokens)
    check_seq_len(model, seq_len)
    if output is not None:
        source = default_cache_dir() if model in DEFAULT_NAMES else model
        check_output_folder(output, overwrite, overwrite_any=overwrite_any, inputs={"--model": source},
                            progress=progress)
        overwrite = overwrite or overwrite_any
    if stream:
        return _stream_job(model, transform, recipe=recipe, group_size=group_size, samples=samples,
                           seq_len=seq_len, seed=seed, device=device, output=output, overwrite=overwrite,
                           progress=progress, batch_size=batch_size, start=start, true_sequential=true_sequential,
                           forward_dtype=autocast)
    net, tokenizer, source = load(model, progress=progress)
    if tokenizer is None:
        raise ValueError(f"{model} has no tokenizer files; qnpu needs one to tokenize calibration text")
    ids = calibration_ids(tokenizer, samples, seq_len, seed)
    report: dict = {"model": source, "recipe": recipe, "group_size": group_size, "calibration":
                    {"samples": samples, "seq_len": seq_len, "seed": seed}, "device": device}
    if evaluate_baseline:
        report["baseline"], report["baseline_cache"] = cached_baseline(
            net, tokenizer, model_identity(model), EVAL_SLICES, eval_tokens, use_cache=baseline_cache, progress=progress)
    before = weight_bytes(net)
    t0 = time.perf_counter()
    result = quantize_model(net, transform, ids, device=device, progress=progress, batch_size=batch_size,
                            true_sequential=true_sequential, forward_dtype=autocast)
    report["true_sequential"] = result.true_sequential
    report["forward_dtype"] = forward_dtype or str(next(net.parameters()).dtype).removeprefix("torch.")
    report["quantize_seconds"] = round(time.perf_counter() - t0, 2)
    report["worst_layers"], report["linear_errors"] = layer_errors(result)
    report["error_sample_tokens"], report["data_free"] = result.error_sample_tokens, result.data_free
    report["weight_bytes"] = {"before": before["linear_weights"], **weight_bytes(net)}
    schemes = plan(net, lowered) if lowered is not None else None
    if evaluate_result:
        report["quantized"] = evaluate(net, tokenizer, n_tokens=eval_tokens, progress=progress)
    if output is not None:
        path = save_quantized(result, output, source=source, recipe=transform, report=report,
                              overwrite=overwrite, tokenizer=tokenizer)
        report["checkpoint"] = str(path)
    if lowered is not None:
        report["lowered"] = lowered_report(net, tokenizer, lowered, schemes, eval_tokens if evaluate_result else 0,
                                           progress)
    report["recipe_dict"] = recipe_to_dict(transform)
    report["wall_seconds"] = round(time.perf_counter() - start, 2)
    return report


def layer_errors(result) -> tuple[list[dict], list[dict]]:
    """The five linears with the largest relative output error, and every linear's in model order
    (``qnpu report`` plots these from a checkpoint's qnpu.json)."""
    return tuple([{"layer": label, "relative_output_error": err} for label, err in rows]
                 for rows in (result.worst_linears(5), result.linear_errors()))


def lowered_report(net, tokenizer, target: str, schemes: dict, eval_tokens: int | None, progress: bool) -> dict:
    """Lower ``net`` for ``target`` and measure its perplexity (``eval_tokens=0``: no evaluation)."""
    t0 = time.perf_counter()
    low = lower(net, target)
    out = {"target": target, "schemes": scheme_counts(schemes), "lower_seconds": round(time.perf_counter() - t0, 2)}
    if eval_tokens != 0:
        out["perplexity"] = evaluate(low, tokenizer, n_tokens=eval_tokens, progress=progress)
    return out


def _stream_job(model, transform: QTransform, *, recipe: str, group_size, samples: int, seq_len: int, seed,
                device: str, output, overwrite: bool, progress: bool, batch_size: int, start: float,
                true_sequential: bool | None = None, forward_dtype=None) -> dict:
    import transformers

    if output is None:
        raise ValueError("a streamed run writes its result only to a checkpoint: give an output folder")
    if model in DEFAULT_NAMES:
        load_default_tokenizer(progress=progress)  # builds the float cache folder if it is missing
        folder, source = default_cache_dir(), default_source()
    else:
        folder = Path(model)
        if not (folder / "config.json").is_file():
            raise ValueError(f"--stream reads a Hugging Face folder (config.json + safetensors) block by block; "
                             f"{folder} is not one (a .gguf file loads whole: drop --stream)")
        source = folder_source(folder)
    if not (folder / "tokenizer_config.json").is_file():
        raise ValueError(f"{folder} has no tokenizer files; qnpu needs one to tokenize calibration text")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = calibration_ids(tokenizer, samples, seq_len, seed)
    report: dict = {"model": source, "recipe": recipe, "group_size": group_size, "calibration":
                    {"samples": samples, "seq_len": seq_len, "seed": seed}, "device": device, "streamed": True}
    sizes = {"before": 0, "linear_weights": 0}

    def write(block) -> None:
        writer.add(*block.checkpoint_payload())
        for key, w in block.params.items():
            name = key.removesuffix(".weight")
            if key.endswith(".weight") and (name in block.qweights or w.dim() == 2):
                sizes["before"] += w.numel() * w.element_size()
                q = block.qweights.get(name)
                sizes["linear_weights"] += w.numel() * w.element_size() if q is None else q.packed_nbytes

    t0 = time.perf_counter()
    with CheckpointWriter(output, source=source, recipe=recipe_to_dict(transform), overwrite=overwrite,
                          hf_config=json.loads((folder / "config.json").read_text())) as writer:
        result = quantize_from_disk(folder, transform, ids, on_block=write, device=device, batch_size=batch_size,
                                    progress=progress, true_sequential=true_sequential, forward_dtype=forward_dtype)
        report["true_sequential"] = result.true_sequential
        stored = result.config.get("dtype") or result.config.get("torch_dtype") or "float32"
        report["forward_dtype"] = str(forward_dtype or stored).removeprefix("torch.")
        report["quantize_seconds"] = round(time.perf_counter() - t0, 2)
        report["worst_layers"], report["linear_errors"] = layer_errors(result)
        report["error_sample_tokens"], report["data_free"] = result.error_sample_tokens, result.data_free
        report["weight_bytes"] = {**sizes, "note": "decoder-block linears only"}
        report["recipe_dict"] = recipe_to_dict(transform)
        writer.add(result.edges)
        tokenizer.save_pretrained(writer.tmp)
        report["checkpoint"] = str(writer.close(extra={"report": report}, hf_config=result.config))
    report["wall_seconds"] = round(time.perf_counter() - start, 2)
    return report


def load_on(model: str | None, device: str, progress: bool):
    """`load` (``(model, tokenizer, source)``) with the model moved to ``device`` (checked with
    `resolve_device` by the caller before anything is loaded): qnpu eval's ``--device``."""
    net, tokenizer, source = load(model, progress=progress)
    return (net if str(device) == "cpu" else net.to(device)), tokenizer, source  # models load on the CPU


def eval_job(*, model: str | None = None, slices=EVAL_SLICES, eval_tokens: int | None = None,
             progress: bool = True, lowered: str | None = None, text: str | None = None,
             text_dir: str | None = None, skip_bad: bool = False, output: str | None = None,
             device: str = "cpu") -> dict:
    """Perplexity of a model or a qnpu checkpoint on ``device`` on the evaluation slices; with ``lowered``, also
    that of the checkpoint lowered to integer ops for that target (checked before loading). With
    ``text`` (a file) or ``text_dir`` (its ``*.txt`` files), also the perplexity of that text with
    the same windows (`qnpu.eval.text`; ``eval_tokens`` then caps each file), read before loading.
    With ``output`` (a folder, created before loading), the result is also written to its
    ``eval.json`` (what ``qnpu report`` reads)."""
    resolve_device(device)
    if lowered is not None:
        check_target(lowered)
    check_counts(eval_tokens=eval_tokens)
    check_slices(slices)
    corpus = skipped = None
    if text is not None or text_dir is not None:
        corpus, skipped = read_texts(text_files(text, text_dir), skip_bad=skip_bad)
    folder = results_folder(output) if output is not None else None
    net, tokenizer, source = load_on(model, device, progress)
    if tokenizer is None:
        raise ValueError(f"{model} has no tokenizer files (tokenizer_config.json); qnpu needs one to evaluate")
    schemes = plan(net, lowered) if lowered is not None else None
    out = {"model": source, "perplexity": evaluate(net, tokenizer, slices, eval_tokens, progress)}
    if corpus is not None:
        out["text"] = text_perplexity(net, tokenizer, corpus, max_tokens=eval_tokens, progress=progress,
                                      skipped=skipped)
    if lowered is not None:
        low = lower(net, lowered)
        out["lowered"] = {"target": lowered, "schemes": scheme_counts(schemes),
                          "perplexity": evaluate(low, tokenizer, slices, eval_tokens, progress)}
        if corpus is not None:
            out["lowered"]["text"] = text_perplexity(low, tokenizer, corpus, max_tokens=eval_tokens,
                                                     progress=progress, skipped=skipped)
    if folder is not None:
        write_json(folder / EVAL_FILE, out)
        out["output"] = str(folder / EVAL_FILE)
    return out


def eval_efficiency_job(*, grid: EfficiencyGrid, model: str | None = None, lowered: str | None = None,
                        output: str | None = None, progress: bool = True, device: str = "cpu") -> dict:
    """Prefill latency, decode throughput, peak memory and weight bytes (`qnpu.eval.efficiency`) of a
    model, a qnpu checkpoint (simulated) or, with ``lowered``, that checkpoint lowered for the target
    (checked before loading). Writes ``efficiency.json`` and ``efficiency.md`` to ``output`` (default
    ``qnpu-out/eval-efficiency``); returns ``{"efficiency": ...}`` with their paths under ``outputs``.
    The model is measured on ``device``."""
    resolve_device(device)
    if lowered is not None:
        check_target(lowered)
    folder = results_folder(output if output is not None else Path("qnpu-out") / "eval-efficiency")
    net, _, source = load_on(model, device, progress)
    grid.check_fits(net)
    kind = model_kind(net)
    if lowered is not None:
        if not plan(net, lowered):
            raise ValueError(f"--lowered {lowered}: {source['name']} has no quantized linears to lower; give a qnpu "
                             "checkpoint (qnpu quantize --output DIR)")
        net, kind = lower(net, lowered), f"lowered:{lowered}"
    eff = measure_efficiency(net, grid, name=source["name"], kind=kind, progress=progress)
    eff["outputs"] = write_results(eff, folder)
    return {"efficiency": eff}


def eval_code_job(*, task: str, model: str | None = None, data: str | None = None, limit: int | None = None,
                  cot: str | None = None, samples_per_problem: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                  seed: int = 0, max_new_tokens: int = 512, output: str | None = None, skip_bad: bool = False,
                  timeout: float = 10.0, progress: bool = True, device: str = "cpu") -> dict:
    """A code benchmark (HumanEval or MBPP, `qnpu.eval.code`) on a model or a qnpu checkpoint, run on
    ``device``: pass@k of its answers run in the sandbox, the reference solutions' conditional perplexity, answer
    lengths and repetition failures, per CoT mode. Arguments, the data file and the output folder
    are checked before the model is loaded. Results go to ``output`` (default
    ``qnpu-out/eval-<task>``): ``summary.json``, ``problems.jsonl`` (written problem by problem) and
    ``report.md``; earlier results there are replaced."""
    resolve_device(device)
    modes = check_cot(cot)
    generation = GenerationConfig(n=samples_per_problem, temperature=temperature, top_p=top_p,
                                  max_new_tokens=max_new_tokens, seed=seed)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"--timeout {timeout!r} is invalid; allowed: a number of seconds > 0")
    limits = Limits(timeout_s=float(timeout), cpu_s=max(1, int(timeout)))
    problems, data_info = load_problems(task, data, limit=limit, skip_bad=skip_bad)
    folder = results_folder(output if output is not None else Path("qnpu-out") / f"eval-{task}")
    net, tokenizer, source = load_on(model, device, progress)
    if tokenizer is None:
        raise ValueError(f"{model} has no tokenizer files (tokenizer_config.json); qnpu needs one to evaluate")
    return run_code_eval(net, tokenizer, problems, task=task, output=folder, modes=modes, generation=generation,
                         limits=limits, model_info=source, data_info=data_info, progress=progress)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def export_job(*, checkpoint: str, output: str, format: str = "ascend-v1", dtype: str | None = None,
               overwrite: bool = False, progress: bool = True, overwrite_any: bool = False) -> dict:
    """Export a qnpu checkpoint for a serving stack (`qnpu.lowering.export`); format, dtype and output
    folder are checked before the checkpoint is loaded."""
    start = time.perf_counter()
    if format not in FORMATS:
        raise ValueError(f"--format {format} is not supported; allowed: {', '.join(FORMATS)}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype} is invalid; allowed: {', '.join(DTYPES)}")
    check_output_folder(output, overwrite, overwrite_any=overwrite_any, inputs={"the checkpoint": checkpoint},
                        progress=progress)
    overwrite = overwrite or overwrite_any
    net, tokenizer, source = load(checkpoint, progress=progress)
    if dtype is not None:
        net = net.to(DTYPES[dtype])
    schemes = scheme_counts(plan(net))
    path = export(net, output, format, tokenizer=tokenizer, overwrite=overwrite)
    files = {p.name: p.stat().st_size for p in sorted(path.iterdir())}
    return {"checkpoint": source, "format": format, "output": str(path), "dtype": str(next(
        p.dtype for p in net.parameters())).removeprefix("torch."), "layer_types": schemes,
        "files": files, "bytes": sum(files.values()), "wall_seconds": round(time.perf_counter() - start, 2)}
