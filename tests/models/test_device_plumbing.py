"""``--device`` end to end without a GPU: the engine moves each block and its inputs to ``device``, runs
the recipe there by default, brings the results back with the block, creates no tensor without an
explicit device, and the CLI passes ``--device`` through (or refuses a missing CUDA in one line)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from qnpu.cli import main
from qnpu.models.capture import to_device
from qnpu.models.engine import LayerwiseCalibration, quantize_model
from qnpu.models.families import block_structure, family_for
from qnpu.models.qlinear import QLinear
from qnpu.qcore import QSpec, quantize
from qnpu.testing import explicit_devices
from qnpu.transforms import EmptyState, QTransform, WeightsState, recipes, rtn

from .test_engine import calibration, tiny_llama


@pytest.mark.parametrize("name", ["w4a16-gptq", "w4a16-gptaq", "w4a8-hadamard", "w8a8", "w4a16-awq"])
def test_the_engine_creates_every_tensor_on_an_explicit_device(name):
    model = tiny_llama(2)
    with explicit_devices() as calls:
        quantize_model(model, recipes.get(name, group_size=32), calibration(), progress=False, max_stat_tokens=64)
    assert not calls, f"{name}: tensors created without device=: {sorted(set(calls))}"


def test_blocks_go_to_the_device_and_the_recipe_runs_there(monkeypatch):
    moved, seen = [], []
    real_to = nn.Module.to

    def to(self, *args, **kwargs):
        moved.append((type(self).__name__, args[0] if args else kwargs.get("device")))
        return real_to(self, *args, **kwargs)

    def update(view, state):
        seen.append({t.device for t in [*view.params.values(), view.inputs, *(s.hessian for s in view.stats.values())]})
        return view, state

    homes = []
    real_home = LayerwiseCalibration._home

    def home(block, where, *results):
        homes.append(where)
        return real_home(block, where, *results)

    monkeypatch.setattr(nn.Module, "to", to)
    monkeypatch.setattr(LayerwiseCalibration, "_home", staticmethod(home))
    model = tiny_llama(2)
    quantize_model(model, QTransform(lambda view: EmptyState(), update), calibration(), device="cpu", progress=False,
                   true_sequential=False)  # one recipe run per block (no first-batch decision run)
    assert [d for kind, d in moved if kind == "LlamaDecoderLayer"] == [torch.device("cpu")] * 2
    assert seen == [{torch.device("cpu")}] * 2 and homes == [torch.device("cpu")] * 2  # results back at home


def test_the_recipe_device_defaults_to_the_device():
    model = tiny_llama(1)
    family, structure = family_for(model.config), block_structure(model.config)
    assert LayerwiseCalibration(rtn(), family, structure, device="meta").recipe_device == torch.device("meta")
    run = LayerwiseCalibration(rtn(), family, structure, device="meta", recipe_device="cpu")
    assert run.recipe_device == torch.device("cpu")


def _qlinear():
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    q = quantize(w, QSpec(bits=4))
    act = QSpec(bits=8, granularity="tensor", dynamic=False)
    return QLinear(q.dequantize(), qweight=q, act_spec=act, act_qparams=(torch.tensor(0.1), None)), q


def test_results_come_home_once_and_stay_shared():
    block = nn.Module()
    block.lin, q = _qlinear()
    state = (WeightsState({"lin": q}),)
    state, qweights, act = LayerwiseCalibration._home(block, torch.device("meta"), state, {"lin": q},
                                                      {"lin": block.lin.act_qparams})
    assert qweights["lin"].codes.is_meta and state[0].qweights["lin"] is qweights["lin"]  # moved once, shared
    assert block.lin.qweight is qweights["lin"] and block.lin.act_qparams is act["lin"]
    assert to_device(qweights, torch.device("meta"))["lin"] is qweights["lin"]  # nothing to move: the same object


def test_qlinear_moves_its_qparams_and_qweight_with_it():
    layer, q = _qlinear()
    layer.to("meta")
    assert layer.act_qparams[0].is_meta and layer.qweight.codes.is_meta and layer.qweight.scale.is_meta
    layer, q = _qlinear()
    layer.double()  # a dtype cast leaves the stored quantized weight as it is
    assert layer.qweight is q and layer.weight.dtype == torch.float64


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_quantize_on_a_missing_cuda_exits_2_with_one_line(capsys, tmp_path):
    assert main(["quantize", "--device", "cuda", "--no-eval", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA device is available" in err and "Traceback" not in err


def engine_kwargs_of(monkeypatch, argv: list[str]) -> dict:
    """The keywords ``qnpu <argv>`` passes to `quantize_model` (stopped there: exit 2), on a tiny model."""
    import qnpu.jobs

    got = {}

    def stop(model, recipe, ids, **kwargs):
        got.update(kwargs)
        raise ValueError("stopped before quantizing")

    monkeypatch.setattr(qnpu.jobs, "quantize_model", stop)
    monkeypatch.setattr(qnpu.jobs, "load", lambda *a, **k: (tiny_llama(1), _Tokenizer(), {"name": "tiny"}))
    assert main(argv) == 2
    return got


def test_the_quantize_device_reaches_the_engine(monkeypatch, tmp_path):
    import qnpu.jobs

    monkeypatch.setattr(qnpu.jobs, "resolve_device", torch.device)  # a device this machine need not have
    got = engine_kwargs_of(monkeypatch, ["quantize", "--device", "cuda:7", "--no-eval", "--samples", "2",
                                         "--seq-len", "8", "--output", str(tmp_path / "out")])
    assert got["device"] == "cuda:7"


class _Tokenizer:
    """Enough of a tokenizer for the calibration slice: one id per character."""

    def __len__(self):
        return 128

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) % 128 for c in text[:4096]]}


def test_non_finite_block_outputs_are_still_refused_with_the_block_name():
    # the block's output check is summed on the device and read once per block: it must still fire
    def update(view, state):
        norm = view.params["post_attention_layernorm.weight"]
        return view.with_params({"post_attention_layernorm.weight": torch.full_like(norm, float("inf"))}), state

    with pytest.raises(ValueError, match=r"quantized block model.layers.0 produced NaN/Inf outputs"):
        quantize_model(tiny_llama(1), QTransform(lambda view: EmptyState(), update), calibration(), progress=False)
