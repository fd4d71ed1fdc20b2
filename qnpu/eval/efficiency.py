"""Efficiency of a loaded model on its own device: prefill latency over a batch x prompt-length grid,
greedy decode throughput over the KV cache, peak memory and weight bytes (`qnpu eval --efficiency`).

The measures are those of the openPangu-Embedded quantization study (Luo et al. 2025, "Post-Training
Quantization of OpenPangu Models for Efficient Deployment on Atlas A2", arXiv:2512.23367: prefill
speedup and memory of W8A8 / W4A8 against FP16), taken the same way for a float model, a simulated
qnpu checkpoint and a lowered one, so runs compare side by side.

Protocol: inputs are synthetic token ids from a seeded generator (uniform over the vocabulary,
attention mask all ones); each timed point runs ``warmup`` untimed times, then ``repeats`` timed times
(median, min, max), under ``torch.inference_mode``, with the device synchronised before every clock
read (`time.perf_counter`); peak memory is that of the timed runs (after the warm-up, which pages in
weights read from a memory-mapped file and makes one-time allocations). Prefill is one forward pass over the prompt that fills the KV cache and
computes the last position's logits only (as a server does). Decode prefills (untimed), then times
``decode_tokens`` greedy steps, each one token per sequence over the cache.
"""
from __future__ import annotations

import inspect
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from qnpu.eval.footprint import MemoryMeter, release_free_memory, weight_bytes
from qnpu.models.qlinear import QLinear

JSON_FILE, MARKDOWN_FILE = "efficiency.json", "efficiency.md"


def parse_sizes(text: str, flag: str) -> tuple[int, ...]:
    """``"1,4"`` -> ``(1, 4)``: comma-separated integers >= 1 (repeats dropped, order kept); else a
    ValueError naming ``flag``."""
    parts = [p.strip() for p in str(text).split(",")]
    if not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise ValueError(f"{flag} {text!r} is invalid; allowed: comma-separated integers >= 1, e.g. 1,4")
    return tuple(dict.fromkeys(int(p) for p in parts))


@dataclass(frozen=True, kw_only=True)
class EfficiencyGrid:
    """What to measure: every batch size x prompt length, ``decode_tokens`` timed decode steps,
    ``warmup`` untimed and ``repeats`` timed runs per point, ids from ``seed``."""

    batch_sizes: tuple[int, ...] = (1, 4)
    prompt_lens: tuple[int, ...] = (128, 512)
    decode_tokens: int = 32
    warmup: int = 1
    repeats: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        for flag, values in (("--batch-sizes", self.batch_sizes), ("--prompt-lens", self.prompt_lens)):
            if not values or not all(_is_int(v) and v >= 1 for v in values):
                raise ValueError(f"{flag} {','.join(map(str, values))!r} is invalid; allowed: integers >= 1")
        for flag, value, least in (("--decode-tokens", self.decode_tokens, 1), ("--warmup", self.warmup, 0),
                                   ("--repeats", self.repeats, 1)):
            if not _is_int(value) or value < least:
                raise ValueError(f"{flag} {value} is invalid; allowed: an integer >= {least}")

    def check_fits(self, model) -> None:
        """Refuse prompts (plus decoded tokens) longer than the model's ``max_position_embeddings``."""
        limit = getattr(model.config, "max_position_embeddings", None)
        longest = max(self.prompt_lens)
        if _is_int(limit) and longest + self.decode_tokens > limit:
            raise ValueError(f"--prompt-lens {longest} + --decode-tokens {self.decode_tokens} exceeds the model's "
                             f"max_position_embeddings {limit}; use prompt lengths <= {limit - self.decode_tokens}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def synthetic_ids(vocab_size: int, batch: int, length: int, seed: int, device) -> torch.Tensor:
    """``[batch, length]`` token ids uniform over ``[0, vocab_size)`` from a seeded CPU generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=g).to(device)


def device_sync(device: torch.device) -> Callable[[], None]:
    """Wait for the work queued on ``device`` (CUDA / NPU); a no-op on CPU."""
    backend = getattr(torch, device.type, None) if device.type in ("cuda", "npu") else None
    if backend is None or not hasattr(backend, "synchronize"):
        return lambda: None
    return lambda: backend.synchronize(device)


def _last_logits_only(model) -> dict:
    params = inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def _cache_argument(model) -> str:
    """The forward argument taking the KV cache: ``cache`` (transformers >= 5.24), else ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _prefill(model, ids: torch.Tensor):
    """One forward pass over ``ids`` filling a KV cache: ``(cache, next greedy token [batch])``."""
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **_last_logits_only(model))
    return _cache_of(out), out.logits[:, -1].argmax(-1)


def _decode(model, cache, token: torch.Tensor, length: int, steps: int) -> list[torch.Tensor]:
    """``steps`` greedy steps after a prompt of ``length``: one token per sequence over ``cache``."""
    tokens, argument = [token], _cache_argument(model)
    for i in range(steps):
        mask = torch.ones(token.shape[0], length + i + 1, dtype=torch.long, device=token.device)
        out = model(input_ids=tokens[-1][:, None], attention_mask=mask, use_cache=True, **{argument: cache})
        cache = _cache_of(out)
        tokens.append(out.logits[:, -1].argmax(-1))
    return tokens


def greedy_decode(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """The ``steps + 1`` greedy tokens ``[batch, steps + 1]`` after ``ids``: the prefill's, then one per
    cached decode step (the computation `measure_efficiency` times)."""
    with torch.inference_mode():
        cache, token = _prefill(model, ids)
        return torch.stack(_decode(model, cache, token, ids.shape[1], steps), dim=1)


def timed(run: Callable, *, warmup: int, repeats: int, clock: Callable[[], float], sync: Callable[[], None],
          setup: Callable = lambda: None, after_warmup: Callable[[], None] = lambda: None) -> list[float]:
    """Seconds of ``repeats`` calls of ``run(setup())`` after ``warmup`` untimed ones; ``setup`` is never
    timed; ``after_warmup`` is called between the two."""
    for _ in range(warmup):
        run(setup())
    sync()
    after_warmup()
    seconds = []
    for _ in range(repeats):
        state = setup()
        sync()
        start = clock()
        run(state)
        sync()
        seconds.append(clock() - start)
    return seconds


def _stats_ms(seconds: list[float], per: int = 1) -> dict:
    ms = [1000.0 * s / per for s in seconds]
    return {"median": statistics.median(ms), "min": min(ms), "max": max(ms)}


def _rate(tokens: int, ms: float) -> float | None:
    """Tokens per second; None for a zero duration (a clock coarser than the work)."""
    return tokens / (ms / 1000.0) if ms > 0 else None


def model_kind(model) -> str:
    """``"simulated"`` for a model with quantized `QLinear` layers, else ``"float"`` (lowered models are
    named by whoever lowered them: ``"lowered:<target>"``)."""
    return "simulated" if any(isinstance(m, QLinear) and m.qweight is not None for m in model.modules()) \
        else "float"


def measure_efficiency(model, grid: EfficiencyGrid, *, name: str, kind: str, progress: bool = True,
                       clock: Callable[[], float] = time.perf_counter, sync: Callable[[], None] | None = None) -> dict:
    """Prefill latency and decode throughput of ``model`` over ``grid`` on the device its parameters
    are on, with peak memory (`MemoryMeter`) and weight bytes (`weight_bytes`): the ``efficiency``
    object of ``efficiency.json`` (README, "Efficiency"). ``clock`` and ``sync`` default to
    `time.perf_counter` and the device's synchronize."""
    grid.check_fits(model)
    first = next(model.parameters())
    device = first.device
    sync = sync or device_sync(device)
    meter = MemoryMeter(device)
    trimmed = release_free_memory()
    vocab = model.config.vocab_size
    points = [(b, n) for b in grid.batch_sizes for n in grid.prompt_lens]
    prefill, decode, peaks, absolute = [], [], [], []
    bar = tqdm(total=2 * len(points), desc="efficiency", disable=not progress, leave=False)
    with torch.inference_mode():
        for phase in ("prefill", "decode"):
            for batch, length in points:
                bar.set_postfix_str(f"{phase} batch {batch} x {length}")
                ids = synthetic_ids(vocab, batch, length, grid.seed, device)
                common = dict(warmup=grid.warmup, repeats=grid.repeats, clock=clock, sync=sync,
                              after_warmup=meter.start)
                if phase == "prefill":
                    seconds = timed(lambda _: _prefill(model, ids), **common)
                else:
                    seconds = timed(lambda state: _decode(model, *state, length, grid.decode_tokens),
                                    setup=lambda: _prefill(model, ids), **common)
                peak = meter.stop()
                peaks.append(peak)
                absolute.append(meter.absolute)
                if phase == "prefill":
                    ms = _stats_ms(seconds)
                    prefill.append({"batch": batch, "prompt_len": length, "median_ms": ms["median"],
                                    "min_ms": ms["min"], "max_ms": ms["max"],
                                    "tokens_per_s": _rate(batch * length, ms["median"]),
                                    "peak_memory_bytes": peak})
                else:
                    ms = _stats_ms(seconds, per=grid.decode_tokens)
                    decode.append({"batch": batch, "prompt_len": length, "new_tokens": grid.decode_tokens,
                                   "median_ms_per_token": ms["median"], "min_ms_per_token": ms["min"],
                                   "max_ms_per_token": ms["max"],
                                   "tokens_per_s": _rate(batch, ms["median"]), "peak_memory_bytes": peak})
                bar.update()
    bar.close()
    return {"device": str(device), "dtype": str(first.dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "model": {"name": name, "kind": kind},
            "weight_bytes": weight_bytes(model), "warmup": grid.warmup, "repeats": grid.repeats, "seed": grid.seed,
            "prefill_logits": "last position" if _last_logits_only(model) else "all positions",
            "prefill": prefill, "decode": decode,
            "peak_memory_bytes": _max_known(peaks), "peak_memory_absolute_bytes": _max_known(absolute),
            "peak_memory_source": meter.source, "peak_memory_note": meter.note,
            "memory_before_bytes": meter.before, "freed_heap_returned_first": trimmed}


def _max_known(values: list) -> int | None:
    return None if not values or None in values else max(values)


def _num(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def render_markdown(eff: dict) -> str:
    """A short markdown report of an ``efficiency`` object."""
    wb = eff["weight_bytes"]
    lines = [f"# Efficiency: {eff['model']['name']} ({eff['model']['kind']})", "",
             f"{eff['device']}, {eff['dtype']}, {eff['threads']} threads, torch {eff['torch']}; warm-up "
             f"{eff['warmup']}, repeats {eff['repeats']} (median, min-max)", "",
             f"weights: linear {_mib(wb['linear'])} MiB (float {_mib(wb.get('linear_float'))} MiB), "
             f"parameters + buffers {_mib(wb['total'])} MiB; peak memory {_mib(eff['peak_memory_bytes'])} MiB "
             f"({eff['peak_memory_source']}: {eff.get('peak_memory_note', '')}; at its peak "
             f"{_mib(eff.get('peak_memory_absolute_bytes'))} MiB in all)", "",
             "| batch | prompt | prefill ms | min-max | prefill tok/s | decode ms/token | decode tok/s | peak MiB |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    decode = {(r["batch"], r["prompt_len"]): r for r in eff["decode"]}
    for r in eff["prefill"]:
        d = decode.get((r["batch"], r["prompt_len"]), {})
        peaks = [p for p in (r.get("peak_memory_bytes"), d.get("peak_memory_bytes")) if p is not None]
        per_token = f"{d['median_ms_per_token']:.2f}" if d else "-"
        rate = _num(d.get("tokens_per_s"), 1)
        lines.append(f"| {r['batch']} | {r['prompt_len']} | {r['median_ms']:.2f} | {r['min_ms']:.2f}-{r['max_ms']:.2f}"
                     f" | {_num(r['tokens_per_s'], 0)} | {per_token} | {rate} | {_mib(max(peaks)) if peaks else '-'} |")
    if eff["decode"]:
        lines += ["", f"decode: {eff['decode'][0]['new_tokens']} greedy steps over the KV cache after each prompt"]
    return "\n".join(lines) + "\n"


def write_results(eff: dict, folder: str | os.PathLike) -> dict:
    """Write ``{"efficiency": eff}`` to ``folder/efficiency.json`` and `render_markdown` to
    ``efficiency.md`` (each written whole, then renamed into place); returns their paths."""
    folder = Path(folder)
    paths = {"json": folder / JSON_FILE, "markdown": folder / MARKDOWN_FILE}
    texts = {"json": json.dumps({"efficiency": eff}, indent=2, allow_nan=False) + "\n",
             "markdown": render_markdown(eff)}
    for key, path in paths.items():
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(texts[key], encoding="utf-8")
        os.replace(tmp, path)
    return {k: str(p) for k, p in paths.items()}
