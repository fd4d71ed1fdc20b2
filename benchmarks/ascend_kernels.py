"""qnpu's CATLASS kernels vs torch_npu's own ops on the prefill linears of openPangu-Embedded 1B / 7B (Atlas A2).

    python benchmarks/ascend_kernels.py [--models 1b,7b] [--m 128,512,2048,8192,16384] [--dtype bf16]
                                        [--warmup 5] [--repeats 20] [--out PATH] [--dry-run]

Needs an Atlas A2 (910B) NPU with CANN and torch_npu; elsewhere it exits with code 2 and one line
saying why, before any work. ``--dry-run`` needs no NPU: it prints, for every shape, the A2
roofline-bound time of each variant and the block count / waves of the kernels' tilings
(``qnpu.lowering.ascend.kernel_model``), and writes nothing unless ``--out`` is given.

Shapes: the four linears of a decoder layer (qkv, o, gate_up, down) at M tokens (prefill). Variants:

* ``fp_matmul``          torch_npu fp16/bf16 matmul: ``torch.matmul(x (m,k), w (k,n))``
* ``torch_npu_w8a8``     ``torch_npu.npu_quant_matmul(x int8, w int8 (k,n), scale fp32 (n,), pertoken_scale (m,))``
* ``qnpu_w8a8``          ``torch.ops.qnpu.npu_quant_matmul``, same arguments (the CATLASS kernel when loaded,
                         else the torch_npu delegate of ``qnpu.lowering.ascend.enable``)
* ``qnpu_w4a8_channel``  ``torch.ops.qnpu.w4a8_matmul(x int8, w int4pack int32 (k,n/8), scale (n,), pertoken (m,))``
* ``qnpu_w4a8_g128``     the same with ``group_size=128``, scale ``(k/128, n)``
* ``torch_npu_a8w4``     ``torch_npu.npu_quant_matmul`` A8W4: int4pack weight, int64 scale ``(k/256, n)`` from
                         ``npu_trans_quant_param``, pertoken ``(m, 1)``, offset (yOffset) fp32 ``(n,)``; k % 256 == 0

All quantized variants share the same integer codes (int4 values in [-8, 7], held as int8 for the
W8A8 ops) and dyadic scales exact in fp19 / fp16 / bf16, with every group row of the per-group
scales equal to the per-channel scale: every quantized variant then computes the same product as
``torch_npu_w8a8`` (up to the kernels' accumulation rounding), and its max relative difference to
it is reported as a correctness check. Each variant runs inside try/except: a failure records its
error and the run goes on. Timing: warm-up calls, then ``--repeats`` calls each between two
``torch.npu.Event``s (the L2 cache, 192 MB on a 910B, is overwritten before each call unless
``--no-flush-l2``); the median is reported. Results: ``--out`` (default
benchmarks/results/ascend_kernels.json, next to this script) and a markdown table beside it
(.md), rewritten after every linear; compact JSON summary on stdout, table on stderr.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_OUT = RESULTS / "ascend_kernels.json"

# Model dimensions from the models' config.json (hidden_size, intermediate_size, num_hidden_layers,
# num_attention_heads, num_key_value_heads, head_dim) of openPangu-Embedded-1B and -7B.
MODELS = {
    "1b": {"name": "openPangu-Embedded-1B", "hidden_size": 1536, "intermediate_size": 6144, "num_hidden_layers": 26,
           "num_attention_heads": 12, "num_key_value_heads": 6, "head_dim": 128},
    "7b": {"name": "openPangu-Embedded-7B", "hidden_size": 4096, "intermediate_size": 12800, "num_hidden_layers": 34,
           "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128},
}
M_GRID = (128, 512, 2048, 8192, 16384)

# Atlas A2 (910B2) roofline. fp16/bf16: 24 AI cores x 1.8 GHz x 4096 MACs (16x16x16 fractal) x 2 = 353.9 TFLOPS.
# int8: derived, the int8 fractal is 16x32x16, twice the fp16 MACs per cycle -> 707.8 TOPS. int4 x int4 (A8W4's
# MSD split, two int4 passes at twice the int8 rate) and qnpu's W4A8 (int4 widened to int8 on the AIV, int8 cube)
# both run at the int8 rate per logical int8 x int4 MAC, so the W4A8 variants use the int8 peak too.
PEAK_FP16_TFLOPS = 353.9
PEAK_INT8_TOPS = 2 * PEAK_FP16_TFLOPS
HBM_TBPS = 1.6
AI_CORES = 24                      # 910B2 (910B3/B4: 20)
L2_FLUSH_BYTES = 256 * 2**20       # > the 910B's 192 MB L2
GROUP = 128                        # qnpu_w4a8_g128
A8W4_GROUP = 256                   # torch_npu's A8W4 group size

# key: (label, peak (TOPS), unit)
VARIANTS = {
    "fp_matmul": ("torch_npu fp16/bf16 matmul", PEAK_FP16_TFLOPS, "TFLOPS"),
    "torch_npu_w8a8": ("torch_npu W8A8 per-token", PEAK_INT8_TOPS, "TOPS"),
    "qnpu_w8a8": ("qnpu W8A8 kernel", PEAK_INT8_TOPS, "TOPS"),
    "qnpu_w4a8_channel": ("qnpu W4A8 kernel per-channel", PEAK_INT8_TOPS, "TOPS"),
    "qnpu_w4a8_g128": (f"qnpu W4A8 kernel group {GROUP}", PEAK_INT8_TOPS, "TOPS"),
    "torch_npu_a8w4": ("torch_npu A8W4 (group 256)", PEAK_INT8_TOPS, "TOPS"),
}
W8A8_REF = "torch_npu_w8a8"
FP_REF = "fp_matmul"


class NoNpu(Exception):
    """No usable Ascend NPU; the message is the one line the script prints before exiting with code 2."""


def _one_line(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


# -- shapes and the roofline ----------------------------------------------------------------------
def linears(dims: dict) -> dict[str, tuple[int, int]]:
    """``{linear: (K, N)}`` of one decoder layer."""
    h, i, d = dims["hidden_size"], dims["intermediate_size"], dims["head_dim"]
    heads, kv = dims["num_attention_heads"], dims["num_key_value_heads"]
    return {"qkv_proj": (h, (heads + 2 * kv) * d), "o_proj": (heads * d, h),
            "gate_up_proj": (h, 2 * i), "down_proj": (i, h)}


def variant_bytes(variant: str, m: int, k: int, n: int, out_bytes: int = 2) -> int:
    """Minimum HBM traffic: A + B (+ scales, offsets) + output, each read or written once."""
    out = m * n * out_bytes
    if variant == "fp_matmul":
        return 2 * m * k + 2 * k * n + out
    per_token = 4 * m
    if variant in ("torch_npu_w8a8", "qnpu_w8a8"):
        return m * k + k * n + 4 * n + per_token + out
    if variant == "qnpu_w4a8_channel":
        return m * k + k * n // 2 + 4 * n + per_token + out
    if variant == "qnpu_w4a8_g128":
        return m * k + k * n // 2 + 4 * (k // GROUP) * n + per_token + out
    if variant == "torch_npu_a8w4":
        return m * k + k * n // 2 + 8 * (k // A8W4_GROUP) * n + 4 * n + per_token + out
    raise KeyError(variant)


def roofline(variant: str, m: int, k: int, n: int) -> dict:
    """The A2 roofline-bound time ``max(ops / peak, bytes / HBM bandwidth)`` in ms."""
    ops, nbytes = 2 * m * n * k, variant_bytes(variant, m, k, n)
    compute_ms = ops / (VARIANTS[variant][1] * 1e12) * 1e3
    memory_ms = nbytes / (HBM_TBPS * 1e12) * 1e3
    return {"bytes": nbytes, "compute_ms": compute_ms, "memory_ms": memory_ms,
            "bound_ms": max(compute_ms, memory_ms), "bound": "compute" if compute_ms >= memory_ms else "memory"}


def tilings() -> dict:
    from qnpu.lowering.ascend.kernel_model import W4A8_TILING, W8A8_TILING
    return {t.name: t for t in (W8A8_TILING, W4A8_TILING)}


def blocks(tiling, m: int, n: int) -> int:
    """Output blocks of a kernel: ceil(m / L1 M) * ceil(n / L1 N), one block per AI core at a time."""
    return math.ceil(m / tiling.l1[0]) * math.ceil(n / tiling.l1[1])


def plan_shapes(models: list[str], ms: list[int], cores: int = AI_CORES) -> list[dict]:
    """Every (model, linear, m) with its ops, roofline per variant and the tilings' blocks / waves."""
    tiles = tilings()
    rows = []
    for key in models:
        for linear, (k, n) in linears(MODELS[key]).items():
            for m in ms:
                kernel = {}
                for name, t in tiles.items():
                    b = blocks(t, m, n)
                    waves = math.ceil(b / cores)
                    kernel[name] = {"blocks": b, "waves": waves, "wave_efficiency": round(b / (waves * cores), 4)}
                rows.append({"model": key, "linear": linear, "m": m, "k": k, "n": n, "ops": 2 * m * n * k,
                             "a8w4_applies": k % A8W4_GROUP == 0,
                             "roofline": {v: roofline(v, m, k, n) for v in VARIANTS}, "kernels": kernel})
    return rows


def header(models: list[str], ms: list[int], cores: int) -> dict:
    return {"benchmark": "ascend_kernels", "models": {k: MODELS[k] for k in models}, "m": ms,
            "hardware": {"target": "Atlas A2 (910B2)", "ai_cores": cores, "peak_fp16_tflops": PEAK_FP16_TFLOPS,
                         "peak_int8_tops": PEAK_INT8_TOPS, "hbm_tbps": HBM_TBPS,
                         "note": "int8 peak derived: the int8 fractal does 2x the fp16 MACs per cycle; the W4A8 "
                                 "variants use the int8 peak (int4 widened to int8, or A8W4's two int4 passes); "
                                 "roofline bytes are the minimum (no workspace traffic, no re-reads)"},
            "tilings": {name: {"l1": list(t.l1), "l0": list(t.l0)} for name, t in tilings().items()},
            "variants": {k: v[0] for k, v in VARIANTS.items()}}


def _dry_table(shapes: list[dict]) -> str:
    names = list(shapes[0]["kernels"]) if shapes else []
    lines = ["| model | linear | m | K | N | GOP | fp16 bound ms | W8A8 bound ms | W4A8 bound ms | A8W4 bound ms | "
             + " | ".join(f"{n} blocks / waves / fill" for n in names) + " |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(names)]
    for s in shapes:
        r = s["roofline"]
        cell = lambda v: f"{r[v]['bound_ms']:.4f} ({r[v]['bound'][0]})"  # noqa: E731
        lines.append(f"| {s['model']} | {s['linear']} | {s['m']} | {s['k']} | {s['n']} | {s['ops'] / 1e9:.1f} | "
                     f"{cell('fp_matmul')} | {cell('torch_npu_w8a8')} | {cell('qnpu_w4a8_channel')} | "
                     f"{cell('torch_npu_a8w4')} | "
                     + " | ".join(f"{b['blocks']} / {b['waves']} / {b['wave_efficiency']:.2f}"
                                  for b in s["kernels"].values()) + " |")
    lines += ["", "Bound ms: max(ops / peak, bytes / HBM), (c) compute- or (m) memory-bound. Fill: blocks / "
              "(waves x AI cores).", "Reproduce: `python benchmarks/ascend_kernels.py --dry-run`."]
    return "\n".join(lines) + "\n"


# -- the NPU ----------------------------------------------------------------------------------------
def npu_or_raise():
    """Import torch_npu and check for a device; raise `NoNpu` (one line) otherwise."""
    try:
        npu = importlib.import_module("torch_npu")
    except Exception as exc:  # ImportError, or CANN libraries missing at import time
        raise NoNpu(f"no Ascend NPU: torch_npu did not import ({_one_line(exc)})") from None
    try:
        count = npu.npu.device_count() if npu.npu.is_available() else 0
    except Exception as exc:
        raise NoNpu(f"torch_npu imported but no NPU device is available ({_one_line(exc)})") from None
    if not count:
        raise NoNpu("torch_npu imported but no NPU device is available")
    return npu


def load_catlass() -> dict:
    """``enable()`` the Ascend target, then ``kernels.load()`` if it exists; what got loaded."""
    from qnpu.lowering import ascend
    ascend.enable()
    info = {"loaded": False, "load": None, "error": None}
    try:
        kernels = importlib.import_module("qnpu.lowering.ascend.kernels")
    except ModuleNotFoundError as exc:
        info["error"] = f"qnpu.lowering.ascend.kernels is absent ({_one_line(exc)})"
        kernels = None
    except Exception as exc:
        info["error"] = f"qnpu.lowering.ascend.kernels did not import ({_one_line(exc)})"
        kernels = None
    fn = getattr(kernels, "load", None)
    if kernels is not None and fn is None:
        info["error"] = "qnpu.lowering.ascend.kernels has no load()"
    if fn is not None:
        try:
            result = fn()
            info["load"] = repr(result)[:200]
            info["loaded"] = result if isinstance(result, bool) else True
        except Exception as exc:
            info["error"] = f"load() failed ({_one_line(exc)})"
    info["w4a8_npu_kernel"] = _has_npu_kernel("qnpu::w4a8_matmul")
    info["note"] = ("qnpu ops run the CATLASS extension" if info["loaded"] else
                    "CATLASS extension not loaded: qnpu.npu_quant_matmul runs the torch_npu delegate and "
                    "qnpu.w4a8_matmul the plain-torch reference (skipped unless --time-fallbacks)")
    return info


def _device_name(npu) -> str:
    try:
        return str(npu.npu.get_device_name(0))
    except Exception as exc:
        return f"NPU 0 ({_one_line(exc, 80)})"


def _has_npu_kernel(op: str) -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(op, "PrivateUse1"))
    except Exception:
        return False


# -- measurement ------------------------------------------------------------------------------------
@dataclass
class Bench:
    """Where and how to run: ``npu`` is torch_npu (or a stand-in), ``event`` a timing event class or None."""

    npu: object
    device: str
    dtype: torch.dtype
    warmup: int
    repeats: int
    sync: object = lambda: None
    event: object = None
    flush: object = None
    backends: dict = field(default_factory=dict)     # variant -> what serves it
    skip: dict = field(default_factory=dict)         # variant -> reason it is not timed


def time_ms(fn, bench: Bench) -> list[float]:
    for _ in range(bench.warmup):
        fn()
    bench.sync()
    if bench.event is not None:
        pairs = []
        for _ in range(bench.repeats):
            if bench.flush:
                bench.flush()
            start, end = bench.event(enable_timing=True), bench.event(enable_timing=True)
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
        bench.sync()
        return [float(s.elapsed_time(e)) for s, e in pairs]
    times = []
    for _ in range(bench.repeats):
        if bench.flush:
            bench.flush()
        bench.sync()
        start = time.perf_counter()
        fn()
        bench.sync()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _randint(lo: int, hi: int, shape, device: str) -> torch.Tensor:
    return torch.randint(lo, hi, shape, dtype=torch.int32, device=device)


def _dyadic(shape, exp: int, device: str) -> torch.Tensor:
    """float32 values (8..15) / 8 * 2^exp: exact in fp19, fp16 and bf16."""
    return _randint(8, 16, shape, device).to(torch.float32) * 2.0 ** (exp - 3)


def weights(bench: Bench, k: int, n: int) -> dict:
    """The weight-side tensors of every variant for one (k, n)."""
    dev, npu = bench.device, bench.npu
    w4 = _randint(-8, 8, (k, n), dev)                                          # int4 codes, int32
    scale = _dyadic((n,), -9, dev)
    t = {"w_fp": torch.randn(k, n, dtype=bench.dtype, device=dev) * 0.05, "w_i8": w4.to(torch.int8),
         "scale": scale, "scale_g": scale.expand(k // GROUP, n).contiguous()}
    try:
        t["w_packed"] = npu.npu_convert_weight_to_int4pack(w4.contiguous())
    except Exception:                                                          # pack on the host instead
        from qnpu.qcore import pack_int4
        t["w_packed"] = pack_int4(w4.cpu(), dim=-1).to(dev)
    if k % A8W4_GROUP == 0:
        groups = k // A8W4_GROUP
        t["a8w4_scale"] = npu.npu_trans_quant_param(scale.expand(groups, n).reshape(-1)).reshape(groups, n)
        t["a8w4_offset"] = (8.0 * w4.to(torch.float32).sum(0) * scale).to(torch.float32)   # 8 * sum_k W * s2
    return t


def activations(bench: Bench, m: int, k: int) -> dict:
    dev = bench.device
    return {"x_fp": torch.randn(m, k, dtype=bench.dtype, device=dev), "x_i8": _randint(-128, 128, (m, k), dev).to(torch.int8),
            "pertoken": _dyadic((m,), -6, dev)}


def calls(bench: Bench, w: dict, x: dict) -> dict:
    """``{variant: zero-argument callable}`` for one shape."""
    import qnpu.lowering  # noqa: F401  (registers torch.ops.qnpu)
    npu, out, qnpu = bench.npu, bench.dtype, torch.ops.qnpu
    fns = {
        "fp_matmul": lambda: torch.matmul(x["x_fp"], w["w_fp"]),
        "torch_npu_w8a8": lambda: npu.npu_quant_matmul(x["x_i8"], w["w_i8"], w["scale"],
                                                        pertoken_scale=x["pertoken"], output_dtype=out),
        "qnpu_w8a8": lambda: qnpu.npu_quant_matmul(x["x_i8"], w["w_i8"], w["scale"],
                                                   pertoken_scale=x["pertoken"], output_dtype=out),
        "qnpu_w4a8_channel": lambda: qnpu.w4a8_matmul(x["x_i8"], w["w_packed"], w["scale"], x["pertoken"],
                                                      output_dtype=out),
        "qnpu_w4a8_g128": lambda: qnpu.w4a8_matmul(x["x_i8"], w["w_packed"], w["scale_g"], x["pertoken"],
                                                   group_size=GROUP, output_dtype=out),
    }
    if "a8w4_scale" in w:
        pertoken = x["pertoken"].unsqueeze(-1)
        fns["torch_npu_a8w4"] = lambda: npu.npu_quant_matmul(x["x_i8"], w["w_packed"], w["a8w4_scale"],
                                                              offset=w["a8w4_offset"], pertoken_scale=pertoken,
                                                              output_dtype=out)
    return fns


def _rel_diff(y: torch.Tensor, ref: torch.Tensor) -> float:
    d = (y.to(torch.float32) - ref.to(torch.float32)).abs().max()
    return float(d / ref.to(torch.float32).abs().max().clamp_min(1e-30))


def measure_shape(bench: Bench, model: str, linear: str, m: int, k: int, n: int, w: dict) -> list[dict]:
    """One row per variant for one shape: median ms, throughput, roofline, speedups, error or skip reason."""
    x = activations(bench, m, k)
    fns = calls(bench, w, x)
    rows, ref_out = [], None
    for variant, (label, peak, unit) in VARIANTS.items():
        row = {"model": model, "linear": linear, "m": m, "k": k, "n": n, "variant": variant, "label": label,
               "backend": bench.backends.get(variant, "torch_npu"), "status": "ok", "error": None}
        bound = roofline(variant, m, k, n)
        row["roofline_ms"] = bound["bound_ms"]
        row["roofline_bound"] = bound["bound"]
        if variant not in fns:
            row.update(status="skipped", error=f"k={k} is not a multiple of {A8W4_GROUP}")
        elif variant in bench.skip:
            row.update(status="skipped", error=bench.skip[variant])
        else:
            try:
                y = fns[variant]()
                bench.sync()
                if variant == W8A8_REF:
                    ref_out = y
                elif variant != FP_REF and ref_out is not None:
                    row["rel_diff_vs_torch_npu_w8a8"] = _rel_diff(y, ref_out)
                del y
                times = time_ms(fns[variant], bench)
                med = statistics.median(times)
                ops = 2 * m * n * k
                row.update(median_ms=med, min_ms=min(times), unit=unit, throughput=ops / (med * 1e-3) / 1e12,
                           pct_peak=100 * ops / (med * 1e-3) / (peak * 1e12), pct_roofline=100 * bound["bound_ms"] / med)
            except Exception as exc:
                row.update(status="error", error=_one_line(exc, 600))
        rows.append(row)
    by = {r["variant"]: r.get("median_ms") for r in rows}
    for r in rows:
        if r.get("median_ms"):
            for ref, key in ((FP_REF, "speedup_vs_fp"), (W8A8_REF, "speedup_vs_torch_npu_w8a8")):
                if by.get(ref):
                    r[key] = by[ref] / r["median_ms"]
    return rows


def totals(rows: list[dict], models: list[str]) -> dict:
    """``{model: {m: {variant: ms}}}``: num_hidden_layers x the sum over a layer's four linears (all measured)."""
    out = {}
    for key in models:
        layers, names = MODELS[key]["num_hidden_layers"], set(linears(MODELS[key]))
        for m in sorted({r["m"] for r in rows if r["model"] == key}):
            for v in VARIANTS:
                got = {r["linear"]: r["median_ms"] for r in rows
                       if r["model"] == key and r["m"] == m and r["variant"] == v and r.get("median_ms")}
                if set(got) == names:
                    out.setdefault(key, {}).setdefault(str(m), {})[v] = layers * sum(got.values())
    return out


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _table(data: dict) -> str:
    lines = [f"{data.get('device', 'NPU')}; {data.get('env', '')}; {data['dtype']}; median of {data['repeats']} "
             f"after {data['warmup']} warm-up; CATLASS loaded: {data['catlass']['loaded']} ({data['catlass']['note']}).",
             "", "| model | linear | m | K | N | variant | backend | median ms | T(FL)OPS | % peak | roofline ms | "
             "% roofline | vs fp | vs torch_npu W8A8 | rel diff vs W8A8 | status |",
             "|---|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in data["rows"]:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['error']}"
        lines.append(f"| {r['model']} | {r['linear']} | {r['m']} | {r['k']} | {r['n']} | {r['label']} | {r['backend']} | "
                     f"{_fmt(r.get('median_ms'), '.4f')} | {_fmt(r.get('throughput'), '.1f')} | "
                     f"{_fmt(r.get('pct_peak'), '.1f')} | {r['roofline_ms']:.4f} | {_fmt(r.get('pct_roofline'), '.1f')} | "
                     f"{_fmt(r.get('speedup_vs_fp'), '.2f')} | {_fmt(r.get('speedup_vs_torch_npu_w8a8'), '.2f')} | "
                     f"{_fmt(r.get('rel_diff_vs_torch_npu_w8a8'), '.2e')} | {status} |")
    lines += ["", "Linear time per forward (num_hidden_layers x the four linears), ms:", "",
              "| model | m | " + " | ".join(VARIANTS) + " |", "|---|---:|" + "---:|" * len(VARIANTS)]
    for model, per_m in data["totals"].items():
        for m, per_v in per_m.items():
            lines.append(f"| {model} | {m} | " + " | ".join(_fmt(per_v.get(v), ".3f") for v in VARIANTS) + " |")
    lines += ["", "Reproduce: `python benchmarks/ascend_kernels.py`."]
    return "\n".join(lines) + "\n"


def summary(data: dict, out: Path) -> dict:
    speedups = {}
    for v in VARIANTS:
        xs = [r["speedup_vs_torch_npu_w8a8"] for r in data["rows"] if r["variant"] == v and r.get("speedup_vs_torch_npu_w8a8")]
        if xs:
            speedups[v] = round(math.exp(sum(map(math.log, xs)) / len(xs)), 4)
    return {"out": str(out), "device": data.get("device"), "catlass_loaded": data["catlass"]["loaded"],
            "rows": len(data["rows"]), "errors": sum(r["status"] == "error" for r in data["rows"]),
            "skipped": sum(r["status"] == "skipped" for r in data["rows"]),
            "geomean_speedup_vs_torch_npu_w8a8": speedups, "linear_ms_per_forward": data["totals"]}


def _write(data: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))
    out.with_suffix(".md").write_text(_table(data))


def run(args, models: list[str], ms: list[int], out: Path, npu, device: str = "npu") -> dict:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    npu.npu.set_device(0)
    catlass = load_catlass()
    backends = {"qnpu_w8a8": "CATLASS" if catlass["loaded"] else "torch_npu delegate",
                "qnpu_w4a8_channel": "CATLASS" if catlass["w4a8_npu_kernel"] else "reference",
                "qnpu_w4a8_g128": "CATLASS" if catlass["w4a8_npu_kernel"] else "reference"}
    skip = {} if catlass["w4a8_npu_kernel"] or args.time_fallbacks else {
        v: "no NPU kernel registered for qnpu.w4a8_matmul (it would run the plain-torch reference; "
           "--time-fallbacks times it)"
        for v in ("qnpu_w4a8_channel", "qnpu_w4a8_g128")}
    event = getattr(npu.npu, "Event", None)
    flush_buf = None if args.no_flush_l2 else torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
    bench = Bench(npu=npu, device=device, dtype=dtype, warmup=args.warmup, repeats=args.repeats,
                  sync=npu.npu.synchronize, event=event, flush=None if flush_buf is None else flush_buf.zero_,
                  backends=backends, skip=skip)
    try:
        props = npu.npu.get_device_properties(0)
        cores = int(getattr(props, "cube_core_num", 0) or AI_CORES)
    except Exception:
        cores = AI_CORES
    torch.manual_seed(0)
    data = {**header(models, ms, cores), "dry_run": False, "dtype": args.dtype, "warmup": args.warmup,
            "repeats": args.repeats, "timer": "npu.Event" if event else "perf_counter + synchronize",
            "l2_flushed": flush_buf is not None, "device": _device_name(npu),
            "env": f"torch {torch.__version__}, torch_npu {getattr(npu, '__version__', '?')}, {platform.machine()}",
            "catlass": catlass, "shapes": plan_shapes(models, ms, cores), "rows": [], "totals": {}}
    print(f"CATLASS: {catlass['note']}" + (f" [{catlass['error']}]" if catlass["error"] else ""), file=sys.stderr)
    for key in models:
        for linear, (k, n) in linears(MODELS[key]).items():
            w = weights(bench, k, n)
            for m in ms:
                rows = measure_shape(bench, key, linear, m, k, n, w)
                data["rows"] += rows
                print(f"{key} {linear} m={m}: " + ", ".join(
                    f"{r['variant']} {r['median_ms']:.4f} ms" if r.get("median_ms") else f"{r['variant']} {r['status']}"
                    for r in rows), file=sys.stderr, flush=True)
            del w
            npu.npu.empty_cache()
            data["totals"] = totals(data["rows"], models)
            _write(data, out)
    return data


def _items(values: list[str]) -> list[str]:
    return [v.strip() for s in values for v in s.split(",") if v.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["1b,7b"], help="1b and/or 7b (comma- or space-separated)")
    parser.add_argument("--m", nargs="+", default=[",".join(map(str, M_GRID))], help="token counts M")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16",
                        help="activations of the fp matmul and output dtype of the quantized ops")
    parser.add_argument("--out", default=None, help=f"JSON path (default {DEFAULT_OUT}; a dry run writes nothing "
                        "unless given); a .md table is written beside it")
    parser.add_argument("--dry-run", action="store_true", help="no NPU: shapes, roofline-bound times, kernel blocks")
    parser.add_argument("--ai-cores", type=int, default=AI_CORES, help="AI cores for the dry run's wave count")
    parser.add_argument("--no-flush-l2", action="store_true", help="do not overwrite the L2 cache between calls")
    parser.add_argument("--time-fallbacks", action="store_true",
                        help="time qnpu.w4a8_matmul even when it runs the plain-torch reference (slow)")
    args = parser.parse_args(argv)
    models = list(dict.fromkeys(s.lower() for s in _items(args.models)))
    if not models or any(s not in MODELS for s in models):
        parser.error(f"--models: choose from {sorted(MODELS)}; got {args.models}")
    try:
        ms = [int(s) for s in _items(args.m)]
    except ValueError:
        parser.error(f"--m must be positive integers; got {args.m}")
    if not ms or any(m <= 0 for m in ms) or args.warmup < 0 or args.repeats < 1:
        parser.error("--m must be positive, --warmup >= 0 and --repeats >= 1")

    if args.dry_run:
        data = {**header(models, ms, args.ai_cores), "dry_run": True, "shapes": plan_shapes(models, ms, args.ai_cores)}
        table = _dry_table(data["shapes"])
        if args.out:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(data, indent=1))
            out.with_suffix(".md").write_text(table)
        print(json.dumps(data))
        print(table, file=sys.stderr)
        return 0

    try:
        npu = npu_or_raise()                     # before any other work
    except NoNpu as exc:
        print(exc, file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else DEFAULT_OUT
    data = run(args, models, ms, out, npu)
    _write(data, out)
    print(json.dumps(summary(data, out)))
    print(_table(data), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
