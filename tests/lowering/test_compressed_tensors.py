"""compressed-tensors export: the library itself (0.20.0, via transformers) loads our folders into the
simulated model's numbers; the layout checks and refusals need no library."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from qnpu.lowering import LoweringError, export
from qnpu.lowering.compressed_tensors import CT_VERSION, pack_int32, unpack_int32
from qnpu.models import quantize_model
from qnpu.qcore import QSpec
from qnpu.transforms import chain, hadamard_rotation, masked, quant_specs, rtn
from tests.lowering.test_ascend_v1 import quantized
from tests.models.test_families import configs, ids, relative, tiny_model

U4_ASYM_G32 = QSpec(bits=4, format="uint", symmetric=False, granularity="group", group_size=32, axis=-1)
I8_ASYM = QSpec(bits=8, format="int", symmetric=False)
U4_SYM_G32 = QSpec(bits=4, format="uint", granularity="group", group_size=32, axis=-1)
W4_G32 = QSpec(bits=4, full_range=True, granularity="group", group_size=32, axis=-1)
A8D = QSpec(bits=8, granularity="token", dynamic=True)


def rtn_model(weight: QSpec, family: str = "qwen2", down: tuple | None = None, online_hadamard: bool = False):
    """A tiny model quantized round-to-nearest with ``weight`` (``down``: (weight, activation) specs for
    down_proj; ``online_hadamard``: W8A8 dynamic after QuaRot with its online rotation before down_proj)."""
    steps = [quant_specs(weight=weight)] + ([masked("*.mlp.down_proj", quant_specs(*down))] if down else [])
    if online_hadamard:
        steps = [quant_specs(weight=weight, activation=A8D), hadamard_rotation(online=True)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_model(tiny_model(configs()[family]), chain(*steps, rtn()), ids(), progress=False).model


def qlinears(model) -> dict:
    return {n: m for n, m in model.named_modules() if hasattr(m, "qweight")}


def load_with_library(path, dequantize: bool = False):
    """The export as transformers + compressed-tensors load it: quantized modules, decompressed."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        logits = model(ids()).logits   # the first forward decompresses (transformers' default path)
    return model, logits


# -- layout, without the library ------------------------------------------------------------------

def test_pack_int32_is_the_library_layout():
    """compressed-tensors' pack_to_int32: +2^(b-1), value i of a row at bits [b*i, b*i+b), LSB first."""
    row = torch.arange(-8, 8, dtype=torch.int32).reshape(1, 16)
    words = pack_int32(row, 4)
    assert words.dtype == torch.int32 and words.tolist() == [[0x76543210, 0xFEDCBA98 - 2**32]]
    byte_row = torch.tensor([[-128, -1, 0, 127]])
    assert pack_int32(byte_row, 8).tolist() == [[0xFF807F00 - 2**32]]
    assert pack_int32(byte_row.t(), 8, dim=0).tolist() == [[0xFF807F00 - 2**32]]
    partial = pack_int32(torch.tensor([[-8, 7, 0]]), 4)            # a short last word is zero-padded
    assert partial.tolist() == [[0x8F0]]
    g = torch.Generator().manual_seed(0)
    for bits, dim in ((4, 1), (4, 0), (8, 1), (8, 0)):
        codes = torch.randint(-(1 << bits - 1), 1 << bits - 1, (24, 40), generator=g, dtype=torch.int32)
        packed = pack_int32(codes, bits, dim=dim)
        per = 32 // bits
        assert packed.shape[dim] == -(-codes.shape[dim] // per) and packed.shape[1 - dim] == codes.shape[1 - dim]
        assert torch.equal(unpack_int32(packed, bits, codes.shape[dim], dim=dim), codes.to(torch.int8))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int32(torch.tensor([[8]]), 4)


@pytest.mark.parametrize("case", ["w8a8-dynamic", "w4a16-g32", "u4-asym-g32", "i8-asym"])
def test_export_layout_and_config(tmp_path, case):
    model = {"w8a8-dynamic": lambda: quantized("w8a8-dynamic", family="llama"),
             "w4a16-g32": lambda: quantized("w4a16-gptq", family="llama", group=32),
             "u4-asym-g32": lambda: rtn_model(U4_ASYM_G32),
             "i8-asym": lambda: rtn_model(I8_ASYM)}[case]()
    export(model, tmp_path / "out", format="compressed-tensors")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "out/config.json").read_text())
    qc = config.pop("quantization_config")
    assert config.pop("qnpu_export")["format"] == "compressed-tensors"  # the mark of a folder qnpu wrote
    assert config["dtype"] == config["torch_dtype"] == "float32"
    want = json.loads(json.dumps(model.config.to_dict()))
    assert {k: v for k, v in config.items() if k not in ("dtype", "torch_dtype")} == \
        {k: v for k, v in want.items() if k not in ("dtype", "torch_dtype", "quantization_config")}
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    assert qc["version"] == CT_VERSION and qc["ignore"] == ["lm_head"] and list(qc["config_groups"]) == ["group_0"]
    group = qc["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"] and group["format"] == qc["format"]
    t = load_file(tmp_path / "out/model.safetensors")
    tied = model.config.tie_word_embeddings
    assert ("lm_head.weight" in t) != tied
    for label, m in qlinears(model).items():
        q, p = m.qweight, f"{label}."
        out, k = q.codes.shape
        scale = t[p + "weight_scale"]
        if case == "w8a8-dynamic":
            assert qc["format"] == "int-quantized" and group["input_activations"] == {
                "num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": "token",
                "dynamic": True}
            assert group["weights"] == {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None,
                                        "strategy": "channel", "dynamic": False}
            assert {n for n in t if n.startswith(p)} == {p + "weight", p + "weight_scale"}
            assert t[p + "weight"].dtype == torch.int8 and torch.equal(t[p + "weight"], q.codes)
            assert scale.shape == (out, 1) and torch.equal(scale, q.scale)
            continue
        bits, asym = (4, True) if case == "u4-asym-g32" else (8, True) if case == "i8-asym" else (4, False)
        assert qc["format"] == "pack-quantized" and group["input_activations"] is None
        assert group["weights"] == {"num_bits": bits, "type": "int", "symmetric": not asym, "dynamic": False,
                                    "group_size": None if case == "i8-asym" else 32,
                                    "strategy": "channel" if case == "i8-asym" else "group"}
        names = {"weight_packed", "weight_scale", "weight_shape"} | ({"weight_zero_point"} if asym else set())
        assert {n for n in t if n.startswith(p) and not n.endswith("bias")} == {p + n for n in names}
        packed = t[p + "weight_packed"]
        assert packed.dtype == torch.int32 and packed.shape == (out, k * bits // 32)
        assert t[p + "weight_shape"].dtype == torch.int64 and t[p + "weight_shape"].tolist() == [out, k]
        assert scale.dtype == torch.float32 and torch.equal(scale, q.scale)
        codes = unpack_int32(packed, bits, k).to(torch.int32)
        zp = 0
        if asym:
            assert t[p + "weight_zero_point"].shape == (out * bits // 32, scale.shape[1])
            zp = unpack_int32(t[p + "weight_zero_point"], bits, out, dim=0).to(torch.int32)
            zp = zp.repeat_interleave(k // zp.shape[1], dim=1)
        w = (codes - zp).to(torch.float32) * scale.repeat_interleave(k // scale.shape[1], dim=1)
        assert torch.equal(w, m.weight), label       # (q - zero_point) * scale is the simulated weight


def test_refusals_name_the_layer_and_write_nothing(tmp_path):
    with pytest.raises(LoweringError, match=r"layers\.0\.mlp\.down_proj: an online Hadamard"):
        export(rtn_model(QSpec(bits=8), family="llama", online_hadamard=True), tmp_path / "h",
               format="compressed-tensors")
    cases = [("w8a8", "qwen2", r"q_proj: static activation scales"),
             ("w4a8", "qwen2", r"q_proj: W4A8"),
             ("billm", "qwen2", r"q_proj: BiLLM binarized weights have no compressed-tensors integer scheme"),
             ("slim-llm", "qwen2", r"q_proj: SliM-LLM mixed-precision \(1-3 bit groups\) weights have no "
                                   r"compressed-tensors integer scheme")]
    for recipe, family, message in cases:
        with pytest.raises(LoweringError, match=message):
            export(quantized(recipe, family=family), tmp_path / recipe, format="compressed-tensors")
    with pytest.raises(LoweringError, match="no quantized linears"):
        export(tiny_model(configs()["qwen2"]), tmp_path / "float", format="compressed-tensors")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_overwrite_keeps_the_old_export(tmp_path, monkeypatch):
    model = quantized("w8a16")
    export(model, tmp_path / "out", format="compressed-tensors")
    before = (tmp_path / "out/model.safetensors").read_bytes()
    import qnpu.lowering.exports as ex

    def boom(model, folder, *args, **kwargs):   # fails half-way through writing
        (folder / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(ex, "write_compressed_tensors", boom)
    with pytest.raises(OSError, match="disk full"):
        export(model, tmp_path / "out", format="compressed-tensors", overwrite=True)
    assert (tmp_path / "out/model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# -- the library loads the export -----------------------------------------------------------------

WEIGHT_ONLY = {
    "w8a16-qwen2": lambda: quantized("w8a16"),
    "w4a16-gptq-g32-llama": lambda: quantized("w4a16-gptq", family="llama", group=32),
    "w4a16-rtn-channel-qwen2": lambda: quantized("w4a16-rtn"),
    "w3a16-gptq-asym-g32-qwen2": lambda: quantized("w3a16-gptq", group=32),     # uint3 in the 4-bit container
    "u4-asym-g32-llama": lambda: rtn_model(U4_ASYM_G32, family="llama"),
    "i8-asym-channel-qwen2": lambda: rtn_model(I8_ASYM),
    "u4-sym-g32-qwen2": lambda: rtn_model(U4_SYM_G32),                             # fixed zero point 8
}


@pytest.mark.parametrize("case", list(WEIGHT_ONLY))
def test_library_decompresses_weight_only_exports_to_the_simulated_weights(tmp_path, case):
    """Weight-only: every decompressed weight is bit-identical to the simulated model's, and so are the logits.

    Asymmetric exports load with ``CompressedTensorsConfig(dequantize=True)``: transformers 5.24's default
    path sizes ``weight_zero_point`` unpacked and refuses the packed tensor, the library's own asymmetric
    pack-quantized exports included.
    """
    model = WEIGHT_ONLY[case]()
    export(model, tmp_path / "out", format="compressed-tensors")
    asym = any(not m.qweight.spec.symmetric for m in qlinears(model).values())
    loaded, logits = load_with_library(tmp_path / "out", dequantize=asym)
    for label, m in qlinears(model).items():
        got = loaded.get_submodule(label)
        if not asym:     # the default path keeps the library's quantized modules (decompressed on first use)
            assert got.quantization_scheme.weights.num_bits == (8 if m.qweight.spec.bits > 4 else 4)
        assert torch.equal(got.weight, m.weight), label
    with torch.no_grad():
        assert torch.equal(logits, model(ids()).logits)


def test_library_decompression_in_bfloat16_rounds_only_the_scale(tmp_path):
    """bf16: the library dequantizes ``(q - zp) * scale`` in bf16 with the bf16-rounded scale, so each weight
    is one bf16 rounding from the simulated one (both round the same real number, one step apart at most)."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    model = rtn_model(U4_ASYM_G32).to(torch.bfloat16)
    export(model, tmp_path / "out", format="compressed-tensors")
    config = json.loads((tmp_path / "out/config.json").read_text())
    qc = QuantizationConfig.model_validate(config["quantization_config"])
    scheme = qc.config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    t = load_file(tmp_path / "out/model.safetensors")
    for label, m in qlinears(model).items():
        p = f"{label}."
        state = {n.removeprefix(p): v for n, v in t.items() if n.startswith(p) and not n.endswith("bias")}
        w = compressor.decompress(state, scheme)["weight"]
        assert w.dtype == torch.bfloat16 and t[p + "weight_scale"].dtype == torch.bfloat16
        q = m.qweight
        exact = (q.codes.to(torch.float64) - q.zero_point.repeat_interleave(32, 1)) * \
            q.scale.to(torch.bfloat16).double().repeat_interleave(32, 1)
        assert torch.equal(w, exact.to(torch.bfloat16)), label
        ulp = torch.finfo(torch.bfloat16).eps * m.weight.float().abs()
        assert bool(((w.float() - m.weight.float()).abs() <= ulp).all()), label


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_library_runs_w8a8_dynamic_exports_as_the_simulated_model(tmp_path, family):
    """W8A8 dynamic: weights bit-identical; the library's own per-token fake quantization takes
    ``scale = amax / 127.5`` (calculate_qparams: range / 2), so its logits equal qnpu's simulated model
    with the activation spec on that grid (``full_range=True``) exactly. Against the exported model as
    simulated (``amax / 127``, what vLLM's int8 kernel computes) they differ by the rounding noise of two
    grids: 2.7% (llama) / 2.8% (qwen2) measured on this tiny random model, bound 5%.
    """
    model = quantized("w8a8-dynamic", family=family)
    export(model, tmp_path / "out", format="compressed-tensors")
    loaded, logits = load_with_library(tmp_path / "out")
    same_grid = copy.deepcopy(model)
    for label, m in qlinears(model).items():
        got = loaded.get_submodule(label)
        assert got.quantization_scheme.input_activations.strategy == "token", label
        assert torch.equal(got.weight, m.weight), label
        same_grid.get_submodule(label).act_spec = m.act_spec.replace(full_range=True)
    with torch.no_grad():
        assert torch.equal(logits, same_grid(ids()).logits)
        err = relative(logits, model(ids()).logits)
    assert err < 0.05, err


@pytest.mark.parametrize("down", ["w8a16", "w8a8-dynamic"])
def test_mixed_schemes_get_one_group_each(tmp_path, down):
    """Layers with different schemes: one config group each, targeting the layer names; the top-level
    format is the groups' one format, or ``mixed-precision`` when they differ (as the library infers it)."""
    model = rtn_model(W4_G32, family="llama", down=(QSpec(bits=8), A8D if down == "w8a8-dynamic" else None))
    export(model, tmp_path / "out", format="compressed-tensors")
    qc = json.loads((tmp_path / "out/config.json").read_text())["quantization_config"]
    g0, g1 = qc["config_groups"]["group_0"], qc["config_groups"]["group_1"]
    assert len(qc["config_groups"]) == 2 and g0["format"] == "pack-quantized"
    assert qc["format"] == ("mixed-precision" if down == "w8a8-dynamic" else "pack-quantized")
    assert g1["format"] == ("int-quantized" if down == "w8a8-dynamic" else "pack-quantized")
    assert (g0["weights"]["num_bits"], g0["weights"]["group_size"], g1["weights"]["num_bits"]) == (4, 32, 8)
    assert g1["targets"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert len(g0["targets"]) == 12 and not any("down_proj" in n for n in g0["targets"])
    loaded, logits = load_with_library(tmp_path / "out")
    assert loaded.get_submodule("model.layers.1.mlp.down_proj").quantization_scheme.weights.num_bits == 8
    assert loaded.get_submodule("model.layers.1.mlp.up_proj").quantization_scheme.weights.num_bits == 4
    same_grid = copy.deepcopy(model)
    for label, m in qlinears(model).items():
        assert torch.equal(loaded.get_submodule(label).weight, m.weight), label
        if m.act_spec is not None:
            same_grid.get_submodule(label).act_spec = m.act_spec.replace(full_range=True)
    with torch.no_grad():
        assert torch.equal(logits, same_grid(ids()).logits)
