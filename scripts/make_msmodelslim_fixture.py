#!/usr/bin/env python3
"""Build the msModelSlim AscendV1 test fixtures under tests/fixtures/msmodelslim/.

Run it with a SEPARATE virtual environment that has msModelSlim, never with the
project's own .venv (nothing here is imported by qnpu or its tests):

    python3 -m venv /tmp/msms
    /tmp/msms/bin/pip install torch==2.13.0            # CPU build
    /tmp/msms/bin/pip install msmodelslim==26.1.0 transformers==4.57.6
    /tmp/msms/bin/python scripts/make_msmodelslim_fixture.py

Everything runs on CPU and offline:

1. a tiny random Llama (fixed seed) and an offline WordLevel tokenizer are built
   and saved with ``save_pretrained``;
2. for each scheme (``w8a8`` static, ``w8a8_dynamic``) msModelSlim's own CLI,
   ``msmodelslim quant --device cpu --model_type tiny-llama --config_path <yaml>``
   with an ``apiversion: modelslim_v1`` config (``linear_quant`` processor,
   ``ascendv1_saver``), is run in-process through ``msmodelslim.cli.__main__.main``
   while the model object that msModelSlim loads is remembered, so that the
   calibrated model -- whose linears msModelSlim has replaced by its fake-quant IR
   modules, the same objects the export was written from -- can be run afterwards;
3. the very same command is run again as a real subprocess and its export must be
   bit-identical to the in-process one;
4. as a cross-check the legacy ``modelslim_v0`` pipeline (``Calibrator`` +
   ``save_type=['ascendV1']``) is run with the equivalent settings; how its export
   differs is recorded, and where it is bit-identical (W8A8_DYNAMIC) its
   fake-quant logits are stored as a second reference;
5. ``reference_logits.safetensors`` and ``FIXTURE.json`` (versions, command,
   config, calibration data, numeric format checks) are written into each
   fixture folder.

Every file in the fixture folders except reference_logits.safetensors and
FIXTURE.json is msModelSlim's output, copied byte for byte.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "tests" / "fixtures" / "msmodelslim"

SEED = 0
MODEL_TYPE = "tiny-llama"  # no msModelSlim adapter has this name -> DefaultModelAdapter
CALIB_TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world this is a tiny llama",
    "quantization of neural networks with int8 weights",
    "ascend npu runs w8a8 models fast",
]
VOCAB_SIZE = 256
LLAMA_KWARGS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB_SIZE,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    attention_bias=True,  # q/k/v/o get a bias so that quant_bias carries a real bias term
    mlp_bias=False,
    initializer_range=0.05,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=3,
)

# modelslim_v1 qconfigs. No anti-outlier / smoothing processor: linear_quant only.
SCHEMES = {
    # static: per-tensor asymmetric int8 activations (min-max over the calibration
    # set), per-channel symmetric int8 weights (what msModelSlim's W8A8 practices use)
    "w8a8": {
        "act": {"scope": "per_tensor", "dtype": "int8", "symmetric": False, "method": "minmax"},
        "weight": {"scope": "per_channel", "dtype": "int8", "symmetric": True, "method": "minmax"},
    },
    # dynamic: per-token symmetric int8 activations, per-channel symmetric int8
    # weights (the qconfig of msModelSlim's lab_practice/default/default-w8a8.yaml)
    "w8a8_dynamic": {
        "act": {"scope": "per_token", "dtype": "int8", "symmetric": True, "method": "minmax"},
        "weight": {"scope": "per_channel", "dtype": "int8", "symmetric": True, "method": "minmax"},
    },
}
# legacy modelslim_v0 calib_cfg with the same intent, used only as a cross-check
V0_CALIB_CFG = {
    "w8a8": {"w_bit": 8, "a_bit": 8, "mm_tensor": False, "disable_names": ["lm_head"]},
    "w8a8_dynamic": {"w_bit": 8, "a_bit": 8, "mm_tensor": False, "is_dynamic": True, "disable_names": ["lm_head"]},
}


def reference_input_ids() -> torch.Tensor:
    return torch.arange(16, dtype=torch.long).reshape(2, 8) % VOCAB_SIZE


# --------------------------------------------------------------------------- float model


def build_float_model(model_dir: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = sorted({w for line in CALIB_TEXTS for w in line.split()})
    tokens = ["<unk>", "<s>", "</s>", "<pad>"] + words
    tokens += [f"w{i}" for i in range(VOCAB_SIZE - len(tokens))]
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )

    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(torch_dtype="float32", **LLAMA_KWARGS)).eval()
    # transformers initialises biases to 0 and norm weights to 1; randomise them as
    # well so that bias handling and norm weights are actually exercised.
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            elif name.endswith("norm.weight"):
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.1)
    model.save_pretrained(model_dir, safe_serialization=True)
    fast.save_pretrained(model_dir)


def load_float_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()


def forward_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float().contiguous()


# --------------------------------------------------------------------------- configs


def _flow(d: dict) -> str:
    return "{" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in d.items()) + "}"


def v1_yaml(scheme: str, calib_path: Path) -> str:
    q = SCHEMES[scheme]
    return "\n".join(
        [
            "apiversion: modelslim_v1",
            "metadata:",
            f"  config_id: tiny-llama-{scheme.replace('_', '-')}",
            "  score: 0",
            "  verified_model_types: []",
            "  label: {w_bit: 8, a_bit: 8, is_sparse: False, kv_cache: False}",
            "spec:",
            "  process:",
            '    - type: "linear_quant"',
            "      qconfig:",
            f"        act: {_flow(q['act'])}",
            f"        weight: {_flow(q['weight'])}",
            '      include: ["*"]',
            '  runner: "model_wise"',
            "  save:",
            '    - type: "ascendv1_saver"',
            "      part_file_size: 0",
            f"  dataset: {calib_path}",
            "",
        ]
    )


def v0_yaml(scheme: str, calib_path: Path) -> str:
    lines = [
        "apiversion: modelslim_v0",
        "metadata:",
        f"  config_id: tiny-llama-{scheme.replace('_', '-')}-v0",
        "  score: 0",
        "  verified_model_types: []",
        "  label: {w_bit: 8, a_bit: 8, is_sparse: False, kv_cache: False}",
        "spec:",
        "  calib_cfg:",
    ]
    lines += [f"    {k}: {json.dumps(v)}" for k, v in V0_CALIB_CFG[scheme].items()]
    lines += [f"  calib_dataset: {calib_path}", ""]
    return "\n".join(lines)


def cli_argv(model_dir: Path, save_dir: Path, yaml_path: Path) -> list[str]:
    return [
        "quant",
        "--model_path", str(model_dir),
        "--save_path", str(save_dir),
        "--device", "cpu",
        "--model_type", MODEL_TYPE,
        "--config_path", str(yaml_path),
    ]


# --------------------------------------------------------------------------- running msModelSlim


def _cli_main(argv: list[str]) -> None:
    from msmodelslim.cli.__main__ import main as cli_main

    old_argv = sys.argv
    sys.argv = ["msmodelslim", *argv]
    try:
        cli_main()
    finally:
        sys.argv = old_argv


def run_v1_in_process(argv: list[str]):
    """Run the CLI in this process; return the model object msModelSlim quantized."""
    from msmodelslim.model.default.model_adapter import DefaultModelAdapter

    created = []
    original = DefaultModelAdapter.init_model

    def init_model(self, *args, **kwargs):  # same method, the result is only remembered
        model = original(self, *args, **kwargs)
        created.append(model)
        return model

    DefaultModelAdapter.init_model = init_model
    try:
        _cli_main(argv)
    finally:
        DefaultModelAdapter.init_model = original
    if len(created) != 1:
        raise RuntimeError(f"expected msModelSlim to load the model once, got {len(created)}")
    return created[0].eval()


def run_v0_in_process(argv: list[str]):
    """Run the CLI with a modelslim_v0 config; return the Calibrator it created."""
    import msmodelslim.core.quant_service.modelslim_v0.quant_service as v0

    created = []
    original = v0.Calibrator

    class RecordingCalibrator(original):  # same class, only remembers the instance
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append(self)

    v0.Calibrator = RecordingCalibrator
    try:
        _cli_main(argv)
    finally:
        v0.Calibrator = original
    if len(created) != 1:
        raise RuntimeError(f"expected one Calibrator, got {len(created)}")
    return created[0]


def run_cli_subprocess(argv: list[str], log_path: Path, cwd: Path) -> None:
    exe = Path(sys.executable).with_name("msmodelslim")
    cmd = [str(exe), *argv] if exe.exists() else [sys.executable, "-m", "msmodelslim.cli", *argv]
    with open(log_path, "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)


# --------------------------------------------------------------------------- checks


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("quant_model_weight*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _pattern(key: str) -> str:
    return re.sub(r"layers\.\d+\.", "layers.N.", key)


def compare_exports(a: Path, b: Path) -> dict:
    ta, tb = load_tensors(a), load_tensors(b)
    differ = sorted(
        {
            _pattern(k)
            for k in ta.keys() & tb.keys()
            if ta[k].dtype != tb[k].dtype or ta[k].shape != tb[k].shape or not torch.equal(ta[k], tb[k])
        }
    )
    ja = json.loads((a / "quant_model_description.json").read_text())
    jb = json.loads((b / "quant_model_description.json").read_text())
    res = {
        "tensors_identical": not differ and ta.keys() == tb.keys(),
        "description_identical": ja == jb,
        "tensor_patterns_only_in_first": sorted({_pattern(k) for k in ta.keys() - tb.keys()}),
        "tensor_patterns_only_in_second": sorted({_pattern(k) for k in tb.keys() - ta.keys()}),
        "tensor_patterns_with_different_values": differ,
        "weight_files_first": sorted(p.name for p in a.glob("*.safetensors")),
        "weight_files_second": sorted(p.name for p in b.glob("*.safetensors")),
        "description_keys_only_in_first": sorted({_pattern(k) for k in set(ja) - set(jb)}),
        "description_keys_only_in_second": sorted({_pattern(k) for k in set(jb) - set(ja)}),
    }
    res["identical"] = res["tensors_identical"] and res["description_identical"]
    return res


def int64_deq_to_float(deq: torch.Tensor) -> torch.Tensor:
    """int64 deq_scale holding fp32 bits in its low 32 bits -> float32."""
    return deq.to(torch.int32).view(torch.float32)


def quant_linears(model) -> dict:
    from msmodelslim.ir import AutoFakeQuantLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, AutoFakeQuantLinear)}


def export_checks(scheme: str, tensors: dict[str, torch.Tensor], model) -> dict:
    """Numbers relating the export to itself and to msModelSlim's fake-quant modules."""
    mods = quant_linears(model)
    names = sorted(k[: -len(".weight")] for k, v in tensors.items() if k.endswith(".weight") and v.dtype == torch.int8)
    res: dict = {
        "quantized_linears": names,
        "fake_quant_module_classes": sorted({type(m).__name__ for m in mods.values()}),
        "float_tensors": sorted({_pattern(k) for k, v in tensors.items() if v.is_floating_point() and
                                 not any(k.startswith(n + ".") for n in names)}),
    }
    if sorted(mods) != names:
        raise RuntimeError(f"fake-quant modules {sorted(mods)} != exported int8 linears {names}")
    w_equal = bias_equal = True
    for n in names:
        m = mods[n]
        w_equal &= bool(torch.equal(m.weight.data, tensors[n + ".weight"]))
        if m.bias is not None:
            bias_equal &= bool(torch.equal(m.bias.data.float(), tensors[n + ".bias"].float()))
        else:
            bias_equal &= (n + ".bias") not in tensors
    res["module_int8_weight_equals_export"] = w_equal
    res["module_bias_equals_export"] = bias_equal

    if scheme == "w8a8_dynamic":
        ws_equal = all(
            torch.equal(mods[n].weight_scale.data.float().reshape(-1, 1), tensors[n + ".weight_scale"]) for n in names
        )
        res["weight_scale_equals_module_weight_scale"] = bool(ws_equal)
        res["max_abs_weight_offset"] = max(tensors[n + ".weight_offset"].abs().max().item() for n in names)
        return res

    deq_exact = hi_zero = off_int = in_equal = True
    deq_max_rel, qb_max = 0.0, 0
    for n in names:
        m = mods[n]
        in_scale = tensors[n + ".input_scale"].float()
        in_off = tensors[n + ".input_offset"].float()
        in_equal &= bool(
            torch.equal(m.input_scale.data.float().reshape(-1), in_scale)
            and torch.equal(m.input_offset.data.float().reshape(-1), in_off)
        )
        deq = tensors[n + ".deq_scale"]
        if deq.dtype == torch.int64:
            hi_zero &= bool(((deq >> 32) == 0).all())
            deq_f = int64_deq_to_float(deq)
        else:
            deq_f = deq.float()
        expect = in_scale * m.weight_scale.data.float().reshape(-1)
        deq_exact &= bool(torch.equal(deq_f, expect))
        deq_max_rel = max(deq_max_rel, ((deq_f - expect).abs() / expect.abs()).max().item())
        w = tensors[n + ".weight"].float()
        bias = tensors.get(n + ".bias")
        bias = torch.zeros(w.shape[0]) if bias is None else bias.float()
        qb = torch.round(bias / deq_f - w.sum(1) * in_off)
        qb_max = max(qb_max, int((qb - tensors[n + ".quant_bias"].float()).abs().max().item()))
        off_int &= bool(torch.equal(in_off, in_off.round()))
    res.update(
        input_scale_offset_equal_module=in_equal,
        deq_scale_dtype=str(tensors[names[0] + ".deq_scale"].dtype),
        deq_scale_int64_high_32_bits_all_zero=hi_zero,
        deq_scale_equals_input_scale_times_module_weight_scale_bit_exact=deq_exact,
        deq_scale_max_rel_diff=deq_max_rel,
        quant_bias_formula="round(bias / deq_scale - weight_int8.sum(1) * input_offset), bias = 0 where absent",
        quant_bias_max_abs_diff=qb_max,
        input_offset_integral=off_int,
    )
    return res


def probe_v1_linear(scheme: str, model) -> dict:
    """Compare one fake-quant linear of msModelSlim with closed forms on random input."""
    name, m = next(iter(quant_linears(model).items()))
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(2, 5, m.weight.shape[1], generator=gen) * 2 + 0.3
    w = m.weight.data.float() * m.weight_scale.data.float().reshape(-1, 1)

    def lin(xq):
        return F.linear(xq, w, None if m.bias is None else m.bias.data)

    with torch.no_grad():
        got = m(x)
        out: dict = {"layer": name, "weight_dequant": "weight_int8 * weight_scale[:, None]"}
        if scheme == "w8a8":
            s, o = m.input_scale.data.float(), m.input_offset.data.float()
            out["activation_formula"] = "(clamp(round(x / input_scale) + input_offset, -128, 127) - input_offset) * input_scale"
            out["max_abs_diff"] = (got - lin((torch.clamp(torch.round(x / s) + o, -128, 127) - o) * s)).abs().max().item()
            return out
        s_tok = x.abs().amax(-1, keepdim=True) / 127
        ref_tok = lin(torch.clamp(torch.round(x / s_tok), -128, 127) * s_tok)
        xr = x.reshape(-1, x.shape[-1])
        s_ch = xr.abs().amax(0) / 127
        ref_ch = lin((torch.clamp(torch.round(xr / s_ch), -128, 127) * s_ch).reshape(x.shape))
        out["per_token_symmetric_formula"] = "s = max|x| over each token's features / 127; clamp(round(x/s), -128, 127) * s"
        out["max_abs_diff_vs_per_token_symmetric"] = (got - ref_tok).abs().max().item()
        out["per_input_channel_symmetric_formula"] = (
            "s = max|x| over ALL tokens of the call, per input feature / 127; clamp(round(x/s), -128, 127) * s"
        )
        out["max_abs_diff_vs_per_input_channel_symmetric"] = (got - ref_ch).abs().max().item()
        out["max_abs_diff_batch_of_1_vs_batch_of_2"] = (m(x[:1]) - got[:1]).abs().max().item()
        return out


def probe_v0_dynamic(calibrator) -> dict:
    from msmodelslim.pytorch.llm_ptq.llm_ptq_tools.quant_modules import LinearQuantizer

    name, m = next((n, q) for n, q in calibrator.model.named_modules() if isinstance(q, LinearQuantizer))
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(2, 5, m.in_features, generator=gen) * 2 + 0.3
    with torch.no_grad():
        got = m.quant_input(x.clone())
    xmin = x.amin(-1, keepdim=True).clamp(max=0)
    xmax = x.amax(-1, keepdim=True).clamp(min=0)
    s = (xmax - xmin) / 255
    o = torch.round(-xmin / s) - 128
    ref = (torch.clamp(torch.round(x / s) + o, -128, 127) - o) * s
    return {
        "layer": name,
        "activation_formula": "per token: s = (max(x,0) - min(x,0)) / 255, o = round(-min(x,0)/s) - 128, "
        "(clamp(round(x/s) + o, -128, 127) - o) * s",
        "max_abs_diff": (got - ref).abs().max().item(),
    }


# --------------------------------------------------------------------------- export-only emulation


EMU_DTYPE = torch.float32


def _nonzero(s: torch.Tensor) -> torch.Tensor:
    # an all-zero row/column (token id 3 = pad has a zero embedding) gets scale 1: it quantizes to 0
    return torch.where(s == 0, torch.ones_like(s), s)


class _ExportLinear(torch.nn.Module):
    """A linear computed only from exported tensors (independent of msModelSlim's code)."""

    def __init__(self, t: dict[str, torch.Tensor], name: str, mode: str):
        # float32 like msModelSlim's own modules: int8 x int8 sums stay below 2**24, so they are exact
        super().__init__()
        self.mode = mode
        self.w_int = t[name + ".weight"].to(EMU_DTYPE)
        self.bias = t.get(name + ".bias")
        self.bias = None if self.bias is None else self.bias.to(EMU_DTYPE)
        if name + ".deq_scale" in t:
            deq = t[name + ".deq_scale"]
            self.deq = (int64_deq_to_float(deq) if deq.dtype == torch.int64 else deq.float()).to(EMU_DTYPE)
            self.in_scale = t[name + ".input_scale"].to(EMU_DTYPE)
            self.in_off = t[name + ".input_offset"].to(EMU_DTYPE)
            self.quant_bias = t[name + ".quant_bias"].to(EMU_DTYPE)
        else:
            self.w_scale = t[name + ".weight_scale"].to(EMU_DTYPE).reshape(-1)

    def forward(self, x):
        dt = x.dtype
        x = x.to(EMU_DTYPE)
        if self.mode == "static_int":  # int8 x int8 -> int32, + quant_bias, * deq_scale
            x_int = torch.clamp(torch.round(x / self.in_scale) + self.in_off, -128, 127)
            return ((x_int @ self.w_int.T + self.quant_bias) * self.deq).to(dt)
        if self.mode == "static_fake":  # fake-quant, weight_scale = deq_scale / input_scale, float bias
            s, o = self.in_scale, self.in_off
            xq = (torch.clamp(torch.round(x / s) + o, -128, 127) - o) * s
            y = xq @ (self.w_int * (self.deq / s)[:, None]).T
            return (y if self.bias is None else y + self.bias).to(dt)
        if self.mode == "dyn_per_token_sym":
            s = _nonzero(x.abs().amax(-1, keepdim=True) / 127)
            xq = torch.clamp(torch.round(x / s), -128, 127) * s
        elif self.mode == "dyn_per_token_asym":
            mn, mx = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
            s = _nonzero((mx - mn) / 255)
            o = torch.round(-mn / s) - 128
            xq = (torch.clamp(torch.round(x / s) + o, -128, 127) - o) * s
        elif self.mode == "dyn_per_input_channel_sym":
            s = _nonzero(x.reshape(-1, x.shape[-1]).abs().amax(0) / 127)
            xq = torch.clamp(torch.round(x / s), -128, 127) * s
        else:
            raise ValueError(self.mode)
        y = xq @ (self.w_int * self.w_scale[:, None]).T
        return (y if self.bias is None else y + self.bias).to(dt)


def emulate_from_export(folder: Path, mode: str, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a model built from the fixture folder alone (config.json + exported tensors)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    t = load_tensors(folder)
    cfg = AutoConfig.from_pretrained(str(folder))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()
    qnames = {k[: -len(".weight")] for k, v in t.items() if k.endswith(".weight") and v.dtype == torch.int8}
    for name in qnames:
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, _ExportLinear(t, name, mode))
    float_state = {k: v for k, v in t.items() if not any(k.startswith(n + ".") for n in qnames)}
    missing, unexpected = model.load_state_dict(float_state, strict=False)
    if unexpected or any(not any(m.startswith(n + ".") for n in qnames) for m in missing):
        raise RuntimeError(f"export does not cover the model: missing={missing} unexpected={unexpected}")
    return forward_logits(model, ids)


EMULATION_DOC = (
    "max |logits - reference| for a model rebuilt from this folder alone (config.json + exported tensors, float32 "
    "linears) with: static_int = clamp(round(x/input_scale)+input_offset,-128,127) @ W_int8.T + quant_bias, times "
    "deq_scale, float bias NOT added again; static_fake = fake-quant x, W_int8 * (deq_scale/input_scale), + float "
    "bias; dyn_* = fake-quant x (per_token_sym: s=max|x|/127 per token; per_token_asym: msModelSlim v0 formula; "
    "per_input_channel_sym: s=max|x| over all tokens per feature /127), W_int8 * weight_scale, + float bias"
)


def emulation_checks(scheme: str, folder: Path, ref: dict) -> dict:
    modes = ["static_int", "static_fake"] if scheme == "w8a8" else [
        "dyn_per_input_channel_sym", "dyn_per_token_sym", "dyn_per_token_asym"]
    out: dict = {"note": EMULATION_DOC}
    for mode in modes:
        logits = emulate_from_export(folder, mode, ref["input_ids"])
        out[mode] = {k: (logits - v).abs().max().item() for k, v in ref.items() if k.startswith("logits_")}
    return out


# --------------------------------------------------------------------------- main


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("msmodelslim", "torch", "transformers", "tokenizers", "safetensors", "accelerate", "numpy", "torch_npu"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_scheme(scheme: str, work: Path, model_dir: Path, calib_path: Path, out_root: Path) -> dict:
    from safetensors.torch import save_file

    yaml_path = work / f"{scheme}.yaml"
    yaml_text = v1_yaml(scheme, calib_path)
    yaml_path.write_text(yaml_text)
    export_dir = work / f"export_{scheme}"

    model = run_v1_in_process(cli_argv(model_dir, export_dir, yaml_path))
    tensors = load_tensors(export_dir)

    ids = reference_input_ids()
    logits_float = forward_logits(load_float_model(model_dir), ids)
    logits_fq = forward_logits(model, ids)
    ref = {"input_ids": ids, "logits_float": logits_float, "logits_fake_quant": logits_fq}

    checks = export_checks(scheme, tensors, model)
    checks["fake_quant_linear_probe"] = probe_v1_linear(scheme, model)
    checks["max_abs_logits_float"] = logits_float.abs().max().item()
    checks["max_abs_diff_logits_fake_quant_vs_float"] = (logits_fq - logits_float).abs().max().item()

    # 1) the same command as a separate process must give the same export
    sub_dir = work / f"export_{scheme}_subprocess"
    run_cli_subprocess(cli_argv(model_dir, sub_dir, yaml_path), work / f"cli_{scheme}.log", cwd=work)
    sub = compare_exports(export_dir, sub_dir)
    checks["cli_subprocess_export_identical"] = sub["identical"]
    if not sub["identical"]:
        raise RuntimeError(f"{scheme}: in-process and subprocess exports differ: {sub}")

    # 2) cross-check against the legacy modelslim_v0 pipeline
    v0_yaml_path = work / f"{scheme}_v0.yaml"
    v0_yaml_text = v0_yaml(scheme, calib_path)
    v0_yaml_path.write_text(v0_yaml_text)
    v0_dir = work / f"export_{scheme}_v0"
    calibrator = run_v0_in_process(cli_argv(model_dir, v0_dir, v0_yaml_path))
    cmp_v0 = compare_exports(export_dir, v0_dir)
    cmp_v0["v0_config_yaml"] = v0_yaml_text.replace(str(calib_path), "<calib.jsonl>")
    if scheme == "w8a8_dynamic":
        cmp_v0["v0_activation_probe"] = probe_v0_dynamic(calibrator)
        if cmp_v0["tensors_identical"]:
            ref["logits_fake_quant_v0"] = forward_logits(calibrator.model, ids)
            cmp_v0["max_abs_diff_logits_fake_quant_v0_vs_float"] = (
                (ref["logits_fake_quant_v0"] - logits_float).abs().max().item()
            )
    checks["v1_vs_legacy_v0_export"] = cmp_v0

    dest = out_root / scheme
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for f in sorted(export_dir.iterdir()):
        shutil.copyfile(f, dest / f.name)
        os.chmod(dest / f.name, 0o644)
    save_file(ref, str(dest / "reference_logits.safetensors"), metadata={"producer": "scripts/make_msmodelslim_fixture.py"})
    os.chmod(dest / "reference_logits.safetensors", 0o644)
    checks["export_only_emulation_max_abs_diff"] = emulation_checks(scheme, dest, ref)

    ref_doc = {
        "input_ids": "torch.arange(16).reshape(2, 8) % vocab_size (int64); no attention mask, use_cache=False",
        "logits_float": "the float checkpoint, loaded with transformers in float32",
        "logits_fake_quant": "the model object msModelSlim quantized and saved this export from, after the run: "
        "its 14 decoder linears are msModelSlim fake-quant IR modules (see checks.fake_quant_linear_probe for "
        "exactly what they compute); lm_head, embeddings and norms are float",
    }
    if "logits_fake_quant_v0" in ref:
        ref_doc["logits_fake_quant_v0"] = (
            "legacy modelslim_v0 Calibrator model (Calibrator.run() done) whose own ascendV1 export is bit-identical "
            "to this one; activations fake-quantized per token, asymmetric (checks.v1_vs_legacy_v0_export."
            "v0_activation_probe)"
        )
    fixture = {
        "scheme": scheme,
        "versions": versions(),
        "command": "msmodelslim " + " ".join(
            cli_argv(Path("<float_model>"), Path("<save_path>"), Path(f"<{scheme}.yaml>"))
        ),
        "command_note": "run in-process through msmodelslim.cli.__main__.main() (to keep the quantized model "
        "object) and again as a subprocess, from a scratch working directory; both exports are bit-identical",
        "config_yaml": yaml_text.replace(str(calib_path), "<calib.jsonl>"),
        "calib_jsonl_format": '{"inputs_pretokenized": "<text>"} per line',
        "calib_texts": CALIB_TEXTS,
        "float_model": {
            "class": "LlamaForCausalLM",
            "seed": SEED,
            "dtype": "float32",
            "config": LLAMA_KWARGS,
            "init": "transformers init under torch.manual_seed(0), then biases ~ 0.05 * N(0,1) and norm weights "
            "~ 1 + 0.1 * N(0,1) from torch.Generator().manual_seed(1)",
            "tokenizer": f"tokenizers WordLevel, {VOCAB_SIZE} tokens (4 specials, the calibration words, fillers "
            "w0..), Whitespace pre-tokenizer, wrapped in PreTrainedTokenizerFast",
        },
        "reference_logits": ref_doc,
        "files_sha256": {f.name: sha256(f) for f in sorted(dest.iterdir())},
        "checks": checks,
    }
    (dest / "FIXTURE.json").write_text(json.dumps(fixture, indent=2) + "\n")
    return fixture


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="fixture root (default: %(default)s)")
    ap.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "msmodelslim_fixture_work",
        help="scratch folder; msModelSlim writes its path into *_best_practice.yaml, so the default is fixed "
        "to keep reruns byte-identical (default: %(default)s)",
    )
    ap.add_argument("--schemes", nargs="*", default=list(SCHEMES), choices=list(SCHEMES))
    args = ap.parse_args()

    out_root = args.out.resolve()
    work = args.work.resolve()
    marker = ".msmodelslim_fixture_work"
    if work.exists() and any(work.iterdir()):
        if not (work / marker).exists():
            ap.error(f"--work {work} exists, is not empty and was not made by this script")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / marker).touch()
    # msModelSlim writes scratch files (e.g. the v0 Calibrator's features.npy) into the cwd
    os.chdir(work)

    model_dir = work / "float_model"
    build_float_model(model_dir)
    calib_path = work / "calib.jsonl"
    calib_path.write_text("".join(json.dumps({"inputs_pretokenized": t}) + "\n" for t in CALIB_TEXTS))

    for scheme in args.schemes:
        fx = make_scheme(scheme, work, model_dir, calib_path, out_root)
        print(f"== {scheme}: {out_root / scheme}")
        print(json.dumps(fx["checks"], indent=2))
    print(f"scratch folder: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
