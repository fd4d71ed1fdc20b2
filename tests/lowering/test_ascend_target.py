"""The ``ascend`` target without Ascend hardware: torch_npu missing, torch_npu replaced by a checking
stand-in (`tests.lowering.fake_torch_npu`), and the torch_npu delegates run as the CPU kernels.

One subprocess installs the delegates for the CPU dispatch key (``register_kernels(stand_in,
dispatch_key="CPU")``), runs every lowered model and reports each torch_npu call; the stand-in
refuses any call torch_npu 2.13.0 would refuse and computes with qnpu's reference, so the logits
must equal the reference target's bit for bit.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config

import qnpu.models
from qnpu.lowering import LoweringError, lower, plan
from qnpu.lowering.ops_quant import npu_convert_weight_to_int4pack, npu_trans_quant_param
from qnpu.transforms import recipes
from tests.lowering import fake_torch_npu
from tests.models.test_families import SIZES, configs, ids, tiny_model

ROOT = Path(__file__).resolve().parents[2]
BF16, FP16 = torch.bfloat16, torch.float16
M = 4 * 16  # tokens per forward: ids() is 4 x 16

# case: (recipe, group_size, model size, dtype). "small" has hidden 64 / intermediate 128 (W4A8 widens the
# int4 codes to int8); "a8w4" has every K a multiple of 256, so W4A8 runs the A8W4 npu_quant_matmul.
CASES = {
    "w8a8": ("w8a8", None, "small", BF16),
    "w8a8-fp16": ("w8a8", None, "small", FP16),
    "w8a8-dynamic": ("w8a8-dynamic", None, "small", BF16),
    "w8a16": ("w8a16", None, "small", BF16),
    "w8a16-g32": ("w8a16", 32, "small", BF16),
    "w8a16-g32-fp16": ("w8a16", 32, "small", FP16),
    "w4a16-gptq": ("w4a16-gptq", None, "small", BF16),
    "w4a16-gptq-g32": ("w4a16-gptq", 32, "small", BF16),
    "w3a16-gptq-g32": ("w3a16-gptq", 32, "small", BF16),  # asymmetric: W4A16 with an antiquant_offset
    "w4a8-widened": ("w4a8", None, "small", BF16),
    "w4a8-a8w4": ("w4a8", None, "a8w4", BF16),
}
EXPECTED_SCHEMES = {
    "w8a8": {"W8A8", "W8A8_DYNAMIC"},  # the recipe keeps down_proj per-token dynamic
    "w8a8-fp16": {"W8A8", "W8A8_DYNAMIC"},
    "w8a8-dynamic": {"W8A8_DYNAMIC"},
    "w8a16": {"W8A16"}, "w8a16-g32": {"W8A16"}, "w8a16-g32-fp16": {"W8A16"},
    "w4a16-gptq": {"W4A16"}, "w4a16-gptq-g32": {"W4A16"}, "w3a16-gptq-g32": {"W4A16"},
    "w4a8-widened": {"W4A8_DYNAMIC"}, "w4a8-a8w4": {"W4A8_DYNAMIC"},
}
# the torch_npu ops one forward of a layer of each scheme calls, once each
SCHEME_OPS = {
    "W8A8": ("npu_quantize", "npu_quant_matmul"),
    "W8A8_DYNAMIC": ("npu_dynamic_quant", "npu_quant_matmul"),
    "W8A16": ("npu_weight_quant_batchmatmul",),
    "W4A16": ("npu_weight_quant_batchmatmul",),
    "W4A8_DYNAMIC": ("npu_dynamic_quant", "npu_quant_matmul"),
}


def _config(size):
    if size == "small":
        return configs()["qwen2"]  # qkv biases: every bias path is exercised
    return Qwen2Config(**{**SIZES, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 1})


def _quantized(recipe, group_size, size):
    model = tiny_model(_config(size))
    return qnpu.models.quantize_model(model, recipes.get(recipe, group_size=group_size), ids(), progress=False).model


@pytest.fixture(scope="module")
def quantized():
    """``{case: quantized model in the case's dtype}``, plus float32 and online-Hadamard models."""
    cache, out = {}, {}
    for case, (recipe, gs, size, dtype) in CASES.items():
        if (recipe, gs, size) not in cache:
            cache[recipe, gs, size] = _quantized(recipe, gs, size)
        out[case] = copy.deepcopy(cache[recipe, gs, size]).to(dtype)
    out["float32"] = cache["w8a16", None, "small"]
    out["online-hadamard"] = _quantized("w4a8-hadamard", None, "small").to(BF16)
    return out


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", fake_torch_npu)
    fake_torch_npu.reset()
    return fake_torch_npu


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: type(m) for n, m in model.named_modules()})


def _assert_unchanged(model, snap):
    state, types = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(now[k].dtype == v.dtype and torch.equal(now[k], v) for k, v in state.items())
    assert {n: type(m) for n, m in model.named_modules()} == types


# -- refusals ----------------------------------------------------------------------------------------
def test_ascend_without_torch_npu_names_it_and_changes_nothing(quantized, monkeypatch):
    model = quantized["w8a16"]
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # `import torch_npu` raises ImportError
    snap = _snapshot(model)
    for call in (lambda: lower(model, "ascend"), lambda: plan(model, "ascend")):
        with pytest.raises(LoweringError, match="torch_npu") as err:
            call()
        assert "reference" in str(err.value)  # says what to use instead
    _assert_unchanged(model, snap)
    assert set(plan(model, "reference").values()) == {"W8A16"}  # the reference target does not need it


def test_ascend_refuses_an_online_hadamard_naming_the_layer(quantized, stand_in):
    model = quantized["online-hadamard"]
    online = [n for n, m in model.named_modules() if getattr(m, "online_hadamard", False)]
    assert online and all(n.endswith("mlp.down_proj") for n in online)  # the recipe rotates before down_proj only
    snap = _snapshot(model)
    with pytest.raises(LoweringError, match=rf"^{online[0]}: .*online Hadamard"):
        lower(model, "ascend")
    _assert_unchanged(model, snap)
    assert lower(model, "reference") is not model  # the reference target runs it


def test_ascend_refuses_a_float32_model_naming_the_dtype(quantized, stand_in):
    model = quantized["float32"]
    assert model.get_submodule("model.layers.0.self_attn.q_proj").weight.dtype == torch.float32
    snap = _snapshot(model)
    with pytest.raises(LoweringError, match=r"model\.layers\.0\.self_attn\.q_proj: .*torch\.float32.*bfloat16"):
        lower(model, "ascend")
    _assert_unchanged(model, snap)
    assert set(plan(model, "reference").values()) == {"W8A16"}


# -- lowering with the stand-in -------------------------------------------------------------------
@pytest.fixture(scope="module")
def lowered(quantized):
    """Every case lowered for ``ascend`` (stand-in installed) and for ``reference``, with the
    reference logits; the ascend models are run by the delegates in `delegated`."""
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "torch_npu", fake_torch_npu)
        for case in CASES:
            model = quantized[case]
            snap = _snapshot(model)
            schemes = plan(model, "ascend")
            asc, ref = lower(model, "ascend"), lower(model, "reference")
            _assert_unchanged(model, snap)
            with torch.no_grad():
                logits = ref(ids()).logits
            out[case] = dict(schemes=schemes, ascend=asc, reference=ref, logits=logits)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_ascend_lowering_builds_the_reference_layers(lowered, case):
    got = lowered[case]
    assert set(got["schemes"].values()) == EXPECTED_SCHEMES[case]
    a, r = got["ascend"].state_dict(), got["reference"].state_dict()
    assert a.keys() == r.keys()
    assert all(a[k].dtype == r[k].dtype and torch.equal(a[k], r[k]) for k in r)
    for label, scheme in got["schemes"].items():
        assert got["ascend"].get_submodule(label).scheme == scheme


_DELEGATE_SCRIPT = r"""
import json, sys, traceback
root, payload, out = sys.argv[1:4]
sys.path.insert(0, root)
import torch
from tests.lowering import fake_torch_npu as npu
sys.modules["torch_npu"] = npu
from qnpu.lowering import ascend
data = torch.load(payload, weights_only=False)
lib = ascend.register_kernels(npu, dispatch_key="CPU")  # the delegates replace the CPU reference kernels
report, logits = {}, {}
for case, model in data["models"].items():
    npu.reset()
    try:
        with torch.no_grad():
            logits[case] = model(data["ids"]).logits
        error = None
    except Exception:
        error = traceback.format_exc()
    report[case] = {"calls": list(npu.CALLS), "error": error}
npu.reset()
ops = torch.ops.qnpu
enc = {"words": ops.npu_trans_quant_param(data["scale"], data["offset"], 1),
       "words_default": ops.npu_trans_quant_param(data["scale"]),
       "packed": ops.npu_convert_weight_to_int4pack(data["int4"])}
report["encodings"] = {"calls": list(npu.CALLS), "error": None}
torch.save({"logits": logits, "encodings": enc}, out + ".pt")
with open(out + ".json", "w") as f:
    json.dump(report, f)
"""


@pytest.fixture(scope="module")
def encoding_inputs():
    g = torch.Generator().manual_seed(3)
    return dict(scale=torch.rand(16, generator=g) * 1e-2, offset=torch.randn(16, generator=g) * 40,
                int4=torch.randint(-8, 8, (32, 64), generator=g, dtype=torch.int32))


@pytest.fixture(scope="module")
def delegated(lowered, encoding_inputs, tmp_path_factory):
    """Runs `_DELEGATE_SCRIPT` once: ``(report {case: {calls, error}}, {"logits", "encodings"})``."""
    tmp = tmp_path_factory.mktemp("ascend")
    (tmp / "delegate.py").write_text(_DELEGATE_SCRIPT)
    torch.save({"models": {c: v["ascend"] for c, v in lowered.items()}, "ids": ids(), **encoding_inputs},
               tmp / "payload.pt")
    proc = subprocess.run([sys.executable, str(tmp / "delegate.py"), str(ROOT), str(tmp / "payload.pt"),
                           str(tmp / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp / "out.json").read_text())
    return report, torch.load(tmp / "out.pt", weights_only=False)


def _args(calls, op):
    return [c["args"] for c in calls if c["op"] == op]


def _t(dtype, *shape):
    return {"dtype": str(dtype), "shape": list(shape)}


@pytest.mark.parametrize("case", list(CASES))
def test_delegates_call_torch_npu_validly_and_match_the_reference(lowered, delegated, case):
    report, results = delegated
    got, low = report[case], lowered[case]
    assert got["error"] is None, got["error"]  # the stand-in refused nothing
    # (b) exactly the ops of each layer's scheme, once per layer
    want = Counter(op for scheme in low["schemes"].values() for op in SCHEME_OPS[scheme])
    assert Counter(c["op"] for c in got["calls"]) == want
    # (c) bit-identical to the reference kernels
    assert torch.equal(results["logits"][case], low["logits"])
    dtype = CASES[case][3]
    mm = _args(got["calls"], "npu_quant_matmul")
    schemes = Counter(low["schemes"].values())
    if "W8A8" in schemes:  # static: npu_quantize as vllm-ascend calls it, int32 bias, no pertoken_scale
        for q in _args(got["calls"], "npu_quantize"):
            assert (q["dtype"], q["axis"], q["div_mode"]) == ("torch.qint8", -1, False)
            assert q["scales"] == q["zero_points"] == _t(dtype, 1)
        static = [a for a in mm if a["pertoken_scale"] is None]
        assert len(static) == schemes["W8A8"]
        for a in static:
            n = a["x2"]["shape"][1]
            assert a["scale"] == _t(torch.float32 if dtype == BF16 else torch.int64, n)
            assert a["bias"] == _t(torch.int32, n) and a["output_dtype"] == str(dtype)
    if "W8A8_DYNAMIC" in schemes or case == "w4a8-widened":
        dyn = [a for a in mm if a["pertoken_scale"] is not None]
        assert len(dyn) == schemes["W8A8_DYNAMIC"] + (schemes["W4A8_DYNAMIC"] if case == "w4a8-widened" else 0)
        for a in dyn:
            n = a["x2"]["shape"][1]
            assert a["x2"]["dtype"] == "torch.int8" and a["pertoken_scale"] == _t(torch.float32, M)
            assert a["scale"] == _t(BF16 if dtype == BF16 else torch.float32, n)
    if case == "w4a8-a8w4":  # int32-packed int4 weight, int64 per-256 scale, yOffset, (m, 1) pertoken_scale
        assert len(mm) == schemes["W4A8_DYNAMIC"]
        for a in mm:
            k, n = a["x1"]["shape"][1], a["x2"]["shape"][1] * 8
            assert a["x2"]["dtype"] == "torch.int32" and a["scale"] == _t(torch.int64, k // 256, n)
            assert a["offset"] == _t(torch.float32, n) and a["pertoken_scale"] == _t(torch.float32, M, 1)
            assert a["bias"] is None and a["output_dtype"] == str(dtype)
    for a in _args(got["calls"], "npu_weight_quant_batchmatmul"):
        group = CASES[case][1] or 0
        k, n = a["x"]["shape"][1], a["antiquant_scale"]["shape"][-1]
        assert a["antiquant_group_size"] == group and a["x"] == _t(dtype, M, k)
        assert a["weight"]["dtype"] == ("torch.int32" if "W4A16" in schemes else "torch.int8")
        assert a["antiquant_scale"]["shape"] == ([k // group, n] if group else [1, n])
        assert a["antiquant_offset"] == (a["antiquant_scale"] if case.startswith("w3a16") else None)
    for a in _args(got["calls"], "npu_dynamic_quant"):
        assert a["x"]["dtype"] == str(dtype) and a["smooth_scales"] is None


def test_delegates_of_the_encoding_ops(delegated, encoding_inputs):
    report, results = delegated
    calls = report["encodings"]["calls"]
    assert [c["op"] for c in calls] == ["npu_trans_quant_param", "npu_trans_quant_param",
                                       "npu_convert_weight_to_int4pack"]
    assert calls[0]["args"] == dict(scale=_t(torch.float32, 16), offset=_t(torch.float32, 16), round_mode=1)
    assert calls[1]["args"] == dict(scale=_t(torch.float32, 16), offset=None, round_mode=0)
    s, o, w = encoding_inputs["scale"], encoding_inputs["offset"], encoding_inputs["int4"]
    enc = results["encodings"]
    assert torch.equal(enc["words"], npu_trans_quant_param(s, o, 1))
    assert not torch.equal(enc["words"], npu_trans_quant_param(s, o, 0))  # round_mode reaches the op
    assert torch.equal(enc["words_default"], npu_trans_quant_param(s))
    assert torch.equal(enc["packed"], npu_convert_weight_to_int4pack(w))


# -- the stand-in itself refuses what torch_npu refuses -------------------------------------------------
def _refused(fn, *args, **kw):
    with pytest.raises((fake_torch_npu.NpuArgumentError, TypeError)):
        fn(*args, **kw)


def test_stand_in_enforces_torch_npu_signatures_and_rules():
    npu = fake_torch_npu
    x = torch.randn(8, 64, dtype=BF16)
    xq, tok = npu.npu_dynamic_quant(x)
    w8 = torch.randint(-127, 128, (64, 32), dtype=torch.int8)
    _refused(npu.npu_dynamic_quant, x.float())                      # float32 x: reference-only extension
    _refused(npu.npu_dynamic_quant, x, torch.ones(64, dtype=BF16))  # smooth_scales is keyword-only
    _refused(npu.npu_dynamic_quant, x=x)                            # docs / binding disagree on the name
    ws = torch.rand(32, dtype=BF16)
    npu.npu_quant_matmul(xq, w8, ws, pertoken_scale=tok, output_dtype=BF16)
    _refused(npu.npu_quant_matmul, xq, w8, ws, None, tok)           # offset / pertoken_scale are keyword-only
    _refused(npu.npu_quant_matmul, xq, w8, ws, pertoken_scale=tok.unsqueeze(-1), output_dtype=BF16)  # (m,) here
    _refused(npu.npu_quant_matmul, xq, w8, ws, pertoken_scale=tok, output_dtype=FP16)  # bf16 scale, fp16 out
    _refused(npu.npu_quant_matmul, xq, w8, ws.float(), pertoken_scale=tok, output_dtype=torch.int8)
    _refused(npu.npu_quant_matmul, xq, w8, ws.float(), offset=torch.zeros(32), output_dtype=BF16)  # offset: int8 out
    w4 = torch.zeros(256, 4, dtype=torch.int32)
    words = npu.npu_trans_quant_param(torch.rand(32))
    xq256, tok256 = npu.npu_dynamic_quant(torch.randn(8, 256, dtype=BF16))
    npu.npu_quant_matmul(xq256, w4, words.reshape(1, 32), pertoken_scale=tok256.unsqueeze(-1), output_dtype=BF16)
    _refused(npu.npu_quant_matmul, xq256, w4, words.reshape(1, 32), pertoken_scale=tok256, output_dtype=BF16)
    _refused(npu.npu_quant_matmul, xq256, w4, words, pertoken_scale=tok256.unsqueeze(-1), output_dtype=BF16)
    scale = torch.rand(1, 32, dtype=BF16)
    npu.npu_weight_quant_batchmatmul(x, w8, scale, bias=torch.zeros(32))
    _refused(npu.npu_weight_quant_batchmatmul, x.float(), w8, scale.float())
    _refused(npu.npu_weight_quant_batchmatmul, x, w8, scale, bias=torch.zeros(32, dtype=BF16))
    _refused(npu.npu_weight_quant_batchmatmul, x, w8, torch.rand(2, 32, dtype=BF16))  # groups need the group size
    _refused(npu.npu_weight_quant_batchmatmul, x, w8, torch.rand(2, 32, dtype=BF16), antiquant_group_size=48)
    npu.npu_weight_quant_batchmatmul(x, w8, torch.rand(2, 32, dtype=BF16), antiquant_group_size=32)
    one = torch.ones(1, dtype=BF16)
    npu.npu_quantize(x, one, one, torch.qint8, -1, False)
    _refused(npu.npu_quantize, x, one, torch.ones(1, dtype=FP16), torch.qint8, -1, False)
    _refused(npu.npu_quantize, x, one, one, torch.quint8, -1, False)
    _refused(npu.npu_quantize, x, one, one, torch.qint8, -3, False)
    _refused(npu.npu_trans_quant_param, torch.rand(16, dtype=FP16))
    _refused(npu.npu_trans_quant_param, torch.rand(16), round_mode=2)
    _refused(npu.npu_convert_weight_to_int4pack, torch.full((4, 8), 8, dtype=torch.int32))
    _refused(npu.npu_convert_weight_to_int4pack, torch.zeros(8, 4, dtype=torch.int32).t())
    assert [c["op"] for c in npu.CALLS][:2] == ["npu_dynamic_quant", "npu_quant_matmul"]
    npu.reset()
