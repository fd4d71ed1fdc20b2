"""A damaged qnpu checkpoint is refused in one line naming the file (and the tensor or linear where
there is one), through the path ``qnpu eval`` loads it (`qnpu.models.load`), and ``qnpu eval``
exits 2 on it: never a traceback, never another exception type.

One tiny checkpoint (2 blocks, asymmetric and symmetric 4-bit groups, static int8 activation
scales, an untied lm_head) is built per module. First, explicit damages: a truncated, empty or
garbage shard, a shard missing from disk, a tensor removed (codes, scale, zero point, activation
scale), ``shards`` or ``linears`` removed from ``qnpu.json``, an unknown dtype, wrong shapes, a float
tensor with NaN or an integer dtype, ``qnpu.json`` / ``config.json`` that are not JSON or lack keys.

Then a sweep (hypothesis) over truncation lengths and single-byte changes (position, value):

* any truncation of a shard, ``qnpu.json`` or ``config.json`` is refused;
* a byte changed in a shard's header (its length prefix or its JSON) is refused, or leaves a
  checkpoint whose model computes exactly the undamaged logits (e.g. a change in the header's
  padding or its ``__metadata__``);
* a byte changed in a shard's tensor data, or in ``qnpu.json`` / ``config.json``, is refused when the
  result is invalid (codes outside their range, NaN/Inf, an unknown key or value, a shape that
  no longer matches). A change that leaves valid values (a different but finite weight, scale or
  norm; another valid bit width or epsilon) cannot be detected: the checkpoint stores no checksum.
  For those the sweep requires only that loading and a forward pass do not crash.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from qnpu.cli import main
from qnpu.models import load, quantize_model, save_quantized
from qnpu.qcore import QSpec
from qnpu.transforms import chain, masked, quant_specs, rtn

SYM = "model.layers.1.self_attn.q_proj"   # symmetric int4 groups, static int8 activation scale
ASYM = "model.layers.1.mlp.up_proj"       # asymmetric int4 groups (a zero point)
SWEEP = settings(max_examples=40, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    w4 = QSpec(bits=4, granularity="group", group_size=16, axis=-1)
    recipe = chain(quant_specs(weight=w4, activation=QSpec(bits=8, granularity="tensor")),
                   masked("*.mlp.*", quant_specs(weight=w4.replace(symmetric=False))),
                   rtn())
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    result = quantize_model(LlamaForCausalLM(config).eval(), recipe, ids, progress=False)
    return save_quantized(result, tmp_path_factory.mktemp("ckpt") / "q", source={"name": "tiny"}, recipe=recipe)


IDS = torch.arange(24).reshape(2, 12) % 64


def _logits(folder) -> torch.Tensor:
    model, _, _ = load(folder, progress=False)
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def reference(base) -> torch.Tensor:
    return _logits(base)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("scratch")


def _copy(base: Path, scratch: Path) -> Path:
    folder = scratch / "damaged"
    shutil.rmtree(folder, ignore_errors=True)
    return Path(shutil.copytree(base, folder))


def _meta(folder: Path) -> dict:
    return json.loads((folder / "qnpu.json").read_text())


def _shard_of(folder: Path, tensor: str) -> Path:
    for shard in _meta(folder)["shards"]:
        if tensor in load_file(str(folder / shard)):
            return folder / shard
    raise AssertionError(f"{tensor} is in no shard")


def _refusal(folder: Path) -> str:
    """Load ``folder`` the way ``qnpu eval`` does; return the refusal's message (asserting it is the
    project's one-line ValueError/OSError), or fail when it loads."""
    with pytest.raises((ValueError, OSError)) as info:
        load(folder, progress=False)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def _outcome(folder: Path) -> tuple[str, object]:
    """("refused", message naming a file of ``folder``) or ("loaded", logits): anything else raises."""
    try:
        logits = _logits(folder)
    except (ValueError, OSError) as err:
        message = str(err)
        assert "\n" not in message, message
        names = [p.name for p in folder.iterdir()] + _meta_shards(folder)
        assert str(folder) in message and any(n in message for n in names), message
        event("refused")
        return "refused", message
    event("loaded")
    return "loaded", logits


def _meta_shards(folder: Path) -> list[str]:
    try:
        return [str(s) for s in json.loads((folder / "qnpu.json").read_text())["shards"]]
    except Exception:  # noqa: BLE001 - the damaged qnpu.json itself
        return []


# -- explicit damages ----------------------------------------------------------------------------

def _edit_shard(folder: Path, tensor: str, change) -> Path:
    shard = _shard_of(folder, tensor)
    tensors = load_file(str(shard))
    change(tensors)
    save_file(tensors, str(shard))
    return shard


def _edit_json(folder: Path, name: str, change) -> Path:
    path = folder / name
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return path


def _second_shard(folder: Path) -> Path:
    return folder / _meta(folder)["shards"][1]


def truncated_shard(folder):
    shard = _second_shard(folder)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return shard, ()


def empty_shard(folder):
    shard = _second_shard(folder)
    shard.write_bytes(b"")
    return shard, ()


def garbage_shard(folder):
    shard = _second_shard(folder)
    shard.write_bytes(os.urandom(shard.stat().st_size))
    return shard, ()


def shard_missing_on_disk(folder):
    shard = _second_shard(folder)
    shard.unlink()
    return shard, ()


def _removed(tensor):
    def damage(folder):
        return _edit_shard(folder, tensor, lambda t: t.pop(tensor)), (tensor,)
    damage.__name__ = f"removed_{tensor.rsplit('.', 1)[1]}"
    return damage


def no_shards_key(folder):
    return _edit_json(folder, "qnpu.json", lambda m: m.pop("shards")), ("shards",)


def no_linears_key(folder):
    return _edit_json(folder, "qnpu.json", lambda m: m.pop("linears")), ("linears",)


def unknown_dtype_in_manifest(folder):
    return _edit_json(folder, "qnpu.json", lambda m: m["linears"][SYM].update(dtype="float99")), (SYM, "float99")


def unknown_weight_spec(folder):
    def change(m):
        m["linears"][ASYM]["weight_spec"]["granularity"] = "blocks"
    return _edit_json(folder, "qnpu.json", change), (ASYM,)


def manifest_entry_missing_a_key(folder):
    return _edit_json(folder, "qnpu.json", lambda m: m["linears"][SYM].pop("act_spec")), (SYM, "act_spec")


def linear_not_in_model(folder):
    def change(m):
        m["linears"]["model.layers.1.mlp.side_proj"] = m["linears"][SYM]
    return _edit_json(folder, "qnpu.json", change), ("model.layers.1.mlp.side_proj",)


def wrong_codes_and_scale_shapes(folder):
    def change(t):  # a consistent QTensor of the wrong size: [32, 32] where the model has [64, 32]
        t[f"{ASYM}.codes"], t[f"{ASYM}.scale"] = t[f"{ASYM}.codes"][:32], t[f"{ASYM}.scale"][:32]
        t[f"{ASYM}.zero_point"] = t[f"{ASYM}.zero_point"][:32]
    return _edit_shard(folder, f"{ASYM}.codes", change), (ASYM, "(32, 32)", "(64, 32)")


def scale_shape_against_codes(folder):
    def change(t):
        t[f"{SYM}.scale"] = t[f"{SYM}.scale"][:, :1].contiguous()
    return _edit_shard(folder, f"{SYM}.scale", change), (SYM,)


def wrong_float_shape(folder):
    name = "model.layers.1.input_layernorm.weight"
    return _edit_shard(folder, name, lambda t: t.update({name: t[name][:16].clone()})), (name, "(16,)", "(32,)")


def nan_in_a_float_tensor(folder):
    name = "model.layers.1.post_attention_layernorm.weight"
    return _edit_shard(folder, name, lambda t: t[name].__setitem__(3, float("nan"))), (name,)


def integer_float_tensor(folder):
    name = "lm_head.weight"
    return _edit_shard(folder, name, lambda t: t.update({name: t[name].to(torch.int32)})), (name, "int32")


def nan_activation_scale(folder):
    name = f"{SYM}.act_scale"
    return _edit_shard(folder, name, lambda t: t[name].fill_(float("nan"))), (SYM,)


def zero_point_out_of_range(folder):
    name = f"{ASYM}.zero_point"
    return _edit_shard(folder, name, lambda t: t[name].__setitem__((0, 0), 99)), (ASYM, "zero_point")


def _not_json(name):
    def damage(folder):
        path = folder / name
        path.write_text(path.read_text()[:-7] + "\x00garbage")
        return path, ()
    damage.__name__ = f"{name.split('.')[0]}_not_json"
    return damage


def manifest_not_an_object(folder):
    (folder / "qnpu.json").write_text("[1, 2]")
    return folder / "qnpu.json", ()


def config_without_model_type(folder):
    return _edit_json(folder, "config.json", lambda c: c.pop("model_type")), ("model_type",)


def config_with_unknown_model_type(folder):
    return _edit_json(folder, "config.json", lambda c: c.update(model_type="llama9")), ("llama9",)


def config_with_a_bad_value(folder):
    return _edit_json(folder, "config.json", lambda c: c.update(hidden_act="silv")), ()


DAMAGES = [truncated_shard, empty_shard, garbage_shard, shard_missing_on_disk,
           _removed(f"{SYM}.codes"), _removed(f"{SYM}.scale"), _removed(f"{ASYM}.zero_point"),
           _removed(f"{SYM}.act_scale"), no_shards_key, no_linears_key, unknown_dtype_in_manifest,
           unknown_weight_spec, manifest_entry_missing_a_key, linear_not_in_model, wrong_codes_and_scale_shapes,
           scale_shape_against_codes, wrong_float_shape, nan_in_a_float_tensor, integer_float_tensor,
           nan_activation_scale, zero_point_out_of_range, _not_json("qnpu.json"), _not_json("config.json"),
           manifest_not_an_object, config_without_model_type, config_with_unknown_model_type,
           config_with_a_bad_value]


def test_the_undamaged_checkpoint_loads(base, reference):
    assert set(_meta(base)["linears"]) >= {SYM, ASYM} and len(_meta(base)["shards"]) == 3
    assert torch.isfinite(reference).all()


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__)
def test_each_damage_is_refused_naming_the_file(base, scratch, capsys, damage):
    folder = _copy(base, scratch)
    path, names = damage(folder)
    message = _refusal(folder)
    assert str(path) in message, message
    assert all(n in message for n in names), message
    capsys.readouterr()
    assert main(["eval", str(folder)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qnpu ")]
    assert len(lines) == 1 and lines[0].startswith("qnpu eval: error:") and str(path) in lines[0]


@pytest.mark.parametrize("damage", [truncated_shard, no_shards_key, config_with_a_bad_value],
                         ids=lambda f: f.__name__)
def test_qnpu_eval_in_a_fresh_interpreter(base, tmp_path, damage):
    folder = Path(shutil.copytree(base, tmp_path / "damaged"))
    path, _ = damage(folder)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run([sys.executable, "-m", "qnpu.cli", "eval", str(folder)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("qnpu ")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and str(path) in lines[0]


# -- the sweep -----------------------------------------------------------------------------------

def _files(base: Path) -> list[str]:
    return sorted(p.name for p in base.iterdir() if p.suffix in (".safetensors", ".json"))


def _header_end(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


@SWEEP
@given(data=st.data())
def test_any_truncation_is_refused(base, scratch, data):
    name = data.draw(st.sampled_from(_files(base)), label="file")
    folder = _copy(base, scratch)
    path = folder / name
    content = path.read_bytes()
    cut = data.draw(st.integers(0, len(content) - 1), label="length")
    path.write_bytes(content[:cut])
    kind, _ = _outcome(folder)
    assert kind == "refused"


def _flip(base: Path, scratch: Path, data, name: str, region: str) -> Path:
    folder = _copy(base, scratch)
    path = folder / name
    content = bytearray(path.read_bytes())
    end = _header_end(content) if name.endswith(".safetensors") else len(content)
    lo, hi = {"header": (0, end - 1), "data": (end, len(content) - 1), "all": (0, len(content) - 1)}[region]
    position = data.draw(st.integers(lo, hi), label="position")
    content[position] = data.draw(st.integers(1, 255).map(lambda d: (content[position] + d) % 256), label="value")
    path.write_bytes(bytes(content))
    return folder


@SWEEP
@given(data=st.data())
def test_a_byte_changed_in_a_shard_header_is_refused_or_harmless(base, scratch, reference, data):
    shard = data.draw(st.sampled_from([n for n in _files(base) if n.endswith(".safetensors")]), label="shard")
    kind, result = _outcome(_flip(base, scratch, data, shard, "header"))
    assert kind == "refused" or torch.equal(result, reference)


@SWEEP
@given(data=st.data())
def test_a_byte_changed_in_tensor_data_never_crashes(base, scratch, data):
    """Undetectable when the new value is valid (no checksum): only no crash is required; a value
    that became NaN/Inf is always refused."""
    shard = data.draw(st.sampled_from([n for n in _files(base) if n.endswith(".safetensors")]), label="shard")
    folder = _flip(base, scratch, data, shard, "data")
    stored = load_file(str(folder / shard))  # the header is intact: only values changed
    nonfinite = any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in stored.values())
    kind, _ = _outcome(folder)
    assert kind == "refused" or not nonfinite


@SWEEP
@given(data=st.data())
def test_a_byte_changed_in_the_json_never_crashes(base, scratch, data):
    """A change to another valid value (a bit width, an epsilon) is undetectable: only no crash."""
    name = data.draw(st.sampled_from(["qnpu.json", "config.json"]), label="file")
    _outcome(_flip(base, scratch, data, name, "all"))
