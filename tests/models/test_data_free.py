"""The data-free fast path: a recipe whose transforms read no calibration data (RTN, rotation + RTN,
w8a16, w8a8-dynamic) runs its decoder blocks on the small error sample only, gives bit for bit the
weights of a full calibration, and says how many tokens its error report comes from; recipes that
read statistics (GPTQ, AWQ, SmoothQuant, static activations) still calibrate on every token."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from qnpu.models.engine import ERROR_SAMPLE, quantize_model
from qnpu.models.lazy import quantize_from_disk
from qnpu.qcore import QSpec
from qnpu.transforms import awq, chain, gptaq, gptq, hadamard_rotation, quant_specs, recipes, rtn, smoothquant

from .test_engine import DYNAMIC, calibration, tiny_llama

W4G = QSpec(bits=4, granularity="group", group_size=16, axis=-1)
STATIC = QSpec(bits=8, granularity="tensor")

DATA_FREE = {
    "rtn": lambda: chain(quant_specs(weight=QSpec(bits=4)), rtn()),
    "w8a16": lambda: recipes.get("w8a16"),
    "w8a8-dynamic": lambda: recipes.get("w8a8-dynamic"),
    "w4a16-hqq": lambda: recipes.get("w4a16-hqq", group_size=16),
    "rotation-online+rtn": lambda: chain(quant_specs(weight=W4G, activation=DYNAMIC), hadamard_rotation(seed=3),
                                         rtn()),
}
CALIBRATED = {
    "gptq": lambda: chain(quant_specs(weight=QSpec(bits=4)), gptq()),
    "gptaq": lambda: chain(quant_specs(weight=QSpec(bits=3)), gptaq()),
    "awq": lambda: chain(quant_specs(weight=W4G), awq(), rtn()),
    "smoothquant": lambda: chain(quant_specs(weight=QSpec(bits=8), activation=DYNAMIC), smoothquant(0.8), rtn()),
    "w8a8-static": lambda: recipes.get("w8a8"),
    "static-without-activation_scales": lambda: chain(quant_specs(weight=QSpec(bits=8), activation=STATIC), rtn()),
}


def block_rows(model) -> list[int]:
    """Token rows every decoder block after the first will have run on (a forward pre-hook per block;
    layer 0 also sees the engine's capture pass, which stops there)."""
    rows = [0] * len(model.model.layers)

    def count(i):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            rows[i] += x.shape[0] * x.shape[1]
        return hook

    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(count(i), with_kwargs=True)
    return rows


def many_ids() -> torch.Tensor:
    """More calibration tokens than the default error sample holds (32 x 48 vs 8 x 48)."""
    return calibration(n=32, seq=48)


@pytest.mark.parametrize("name", ["w8a8-dynamic", "rtn"])
def test_a_data_free_recipe_runs_no_calibration_passes(name):
    model, ids = tiny_llama(3), many_ids()
    rows = block_rows(model)
    result = quantize_model(model, DATA_FREE[name](), ids, progress=False)
    sample = min(ERROR_SAMPLE[0], ids.shape[0]) * min(ERROR_SAMPLE[1], ids.shape[1])
    # one float and one quantized pass over the error sample, never over the 32 x 48 calibration set
    assert rows[1:] == [2 * sample] * 2, rows
    assert result.data_free and result.error_sample_tokens == sample
    assert all(0 < e < 1 for b in result.blocks for e in b.linear_errors.values())


def test_the_error_sample_is_a_parameter():
    model, ids = tiny_llama(2), many_ids()
    rows = block_rows(model)
    result = quantize_model(model, DATA_FREE["rtn"](), ids, progress=False, error_sample=(3, 10))
    assert rows[1] == 2 * 30 and result.error_sample_tokens == 30
    with pytest.raises(ValueError, match="error_sample"):
        quantize_model(tiny_llama(1), DATA_FREE["rtn"](), ids, progress=False, error_sample=(0, 10))


# recipes that only round can be calibrated true-sequentially (sequential.basis_preserving); GPTAQ is by default
ROUND_ONLY = {"gptq", "gptaq", "static-without-activation_scales"}


@pytest.mark.parametrize("sequential", [False, True, None])
@pytest.mark.parametrize("name", list(CALIBRATED))
def test_recipes_that_read_statistics_still_calibrate_on_every_token(name, sequential):
    model, ids = tiny_llama(2), many_ids()
    rows = block_rows(model)
    refused = sequential and name not in ROUND_ONLY  # asked for, but the recipe rescales: one pass, with a warning
    with pytest.warns(UserWarning, match="one pass") if refused else contextlib.nullcontext():
        result = quantize_model(model, CALIBRATED[name](), ids, progress=False, batch_size=16,
                                true_sequential=sequential)
    if name in ROUND_ONLY and sequential is not False:  # on by default
        # per group (q/k/v, o, gate/up, down) a quantized-path pass (and a float-path one for GPTAQ), then
        # the output pass (and GPTAQ's float block advancing the float path): block calls that stop at
        # the group or resume from cached tensors (tests/models/test_stages.py counts the linears); and
        # the float block on the first batch, the reference of the block error
        passes, reference = (10 if name == "gptaq" else 5), 16 * ids.shape[1]
    else:
        passes, reference = (3 if name == "gptaq" else 2), 0  # GPTAQ's float path is one more pass
    assert rows[1] == passes * ids.numel() + reference and not result.data_free
    assert result.error_sample_tokens == 128  # the first error_tokens rows of the stats' token sample
    with pytest.raises(ValueError, match="data_free=True, but the recipe reads"):
        quantize_model(tiny_llama(1), CALIBRATED[name](), ids, progress=False, data_free=True)


def _same_result(a, b) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    for x, y in zip(a.blocks, b.blocks):
        assert x.qweights.keys() == y.qweights.keys() and x.specs == y.specs
        for n in x.qweights:
            for field in ("codes", "scale", "zero_point"):
                u, v = getattr(x.qweights[n], field), getattr(y.qweights[n], field)
                assert (u is None and v is None) or torch.equal(u, v), (n, field)
        assert x.act_qparams.keys() == y.act_qparams.keys()
    assert a.edges.keys() == b.edges.keys() and all(torch.equal(a.edges[k], b.edges[k]) for k in a.edges)
    assert a.rotated == b.rotated


@pytest.mark.parametrize("name", list(DATA_FREE))
def test_the_fast_path_gives_the_weights_of_a_full_calibration_bit_for_bit(name):
    model, ids = tiny_llama(3, tied=True), many_ids()
    full = quantize_model(copy.deepcopy(model), DATA_FREE[name](), ids, progress=False, data_free=False)
    fast = quantize_model(model, DATA_FREE[name](), ids, progress=False)
    assert fast.data_free and not full.data_free
    _same_result(full, fast)


def test_streaming_from_disk_takes_the_fast_path_too(tmp_path):
    model, ids = tiny_llama(2), many_ids()
    model.save_pretrained(tmp_path / "float", safe_serialization=True)
    memory = quantize_model(copy.deepcopy(model), DATA_FREE["w8a8-dynamic"](), ids, progress=False, data_free=False)
    streamed = []
    disk = quantize_from_disk(tmp_path / "float", DATA_FREE["w8a8-dynamic"](), ids, on_block=streamed.append,
                              progress=False)
    assert disk.data_free and disk.error_sample_tokens == 8 * 48
    for a, b in zip(memory.blocks, streamed):
        assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
        assert all(torch.equal(a.qweights[n].codes, b.qweights[n].codes) for n in a.qweights)
    assert all(torch.equal(disk.edges[k], memory.edges[k]) for k in disk.edges)
