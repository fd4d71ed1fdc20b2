"""Resumed block forwards (`qnpu.models.stages`): true-sequential calibration from per-batch caches must
give what re-running the block from its input gives, while computing each linear once per batch."""
from __future__ import annotations

import collections
import dataclasses
import warnings

import pytest
import torch

from qnpu.models.engine import quantize_model
from qnpu.models.qlinear import QLinear
from qnpu.models.stages import BlockStages
from qnpu.qcore import QSpec
from qnpu.testing.blocks import random_block
from qnpu.transforms import chain, gptaq, gptq, quant_specs

from .random_llama import llama_of_block

W3 = QSpec(bits=3)
A8 = QSpec(bits=8, granularity="token", dynamic=True)


def quantize(seed: int, rounder, act, *, staged: bool, monkeypatch, calls=None, edit=None):
    """Random block ``seed`` in a one-layer Llama, quantized true-sequentially in batches of 3 (3, 3, 2 rows)."""
    model, ids = llama_of_block(random_block(seed, batch=8, seq=16))
    if edit is not None:
        edit(model.model.layers[0])
    if not staged:
        monkeypatch.setattr(BlockStages, "verify", lambda self, block, forward: (forward(block), False))
    handles = []
    if calls is not None:  # linear name -> token rows it computed (the float Linear, then its QLinear)
        layer = model.model.layers[0]
        # stand-ins take the attention / MLP modules out of the block while they call o / down_proj
        roots = {"self_attn.": layer.self_attn, "mlp.": layer.mlp}

        def count(module, args, output):  # after the forward: a call stopped at its pre-hooks computed nothing
            if isinstance(module, (torch.nn.Linear, QLinear)):
                names = [p + n for p, root in roots.items() for n, m in root.named_modules() if m is module]
                if names:
                    calls[names[0]] += args[0].numel() // args[0].shape[-1]

        handles.append(torch.nn.modules.module.register_module_forward_hook(count))
    recipe = chain(quant_specs(weight=W3, activation=act), rounder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = quantize_model(model, recipe, ids, progress=False, max_stat_tokens=64, true_sequential=True,
                                batch_size=3)
    for h in handles:
        h.remove()
    monkeypatch.undo()
    fell_back = any("re-runs the block" in str(w.message) for w in caught)
    assert fell_back == (not staged or edit is not None)
    return result, model.model(input_ids=ids).last_hidden_state  # lm_head is random in each model: left out


@pytest.mark.parametrize("rounder,act", [(gptq(), None), (gptq(), A8), (gptaq(), None), (gptaq(), A8)],
                         ids=["gptq", "gptq-a8", "gptaq", "gptaq-a8"])
def test_resumed_passes_give_the_restarted_passes_result(rounder, act, monkeypatch):
    staged, logits = quantize(0, rounder, act, staged=True, monkeypatch=monkeypatch)
    plain, plain_logits = quantize(0, rounder, act, staged=False, monkeypatch=monkeypatch)
    block, ref = staged.blocks[0], plain.blocks[0]
    assert block.qweights.keys() == ref.qweights.keys() and len(block.qweights) == 7
    for n in ref.qweights:
        torch.testing.assert_close(block.qweights[n].dequantize(torch.float32),
                                   ref.qweights[n].dequantize(torch.float32), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, plain_logits, rtol=1e-4, atol=1e-4)
    assert block.output_error == pytest.approx(ref.output_error, rel=1e-4)
    assert 0.0 < block.output_error < 1.0


@pytest.mark.parametrize("rounder", [gptq(), gptaq()], ids=["gptq", "gptaq"])
def test_every_linear_runs_once_per_calibration_row(rounder, monkeypatch):
    """Counted over the whole run: block 0's one-pass decision (the first batch, on each path), the float
    reference (the first batch; on block 0 also the check's plain forward) and the check of the resumed
    forward (the first batch), then the groups and the propagation: every row once on each path."""
    calls = collections.Counter()
    quantize(1, rounder, None, staged=True, monkeypatch=monkeypatch, calls=calls)
    paths = 2 if "float_path" in rounder.reads else 1
    rows, first = 8 * 16, 3 * 16
    linears = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    expected = {f"{'self_attn' if n[0] in 'qkvo' else 'mlp'}.{n}": paths * first + 2 * first + paths * rows
                for n in linears}
    assert dict(calls) == expected
    plain = collections.Counter()
    quantize(1, rounder, None, staged=False, monkeypatch=monkeypatch, calls=plain)
    assert plain["self_attn.q_proj"] > calls["self_attn.q_proj"]  # restarting recomputes q for every group


def test_a_block_the_stand_ins_do_not_reproduce_runs_the_plain_passes(monkeypatch):
    def doubled_mlp(block):  # the block's MLP output is not down_proj's: the resumed forward would be wrong
        forward = block.mlp.forward
        block.mlp.forward = lambda x: 2.0 * forward(x)

    staged, logits = quantize(2, gptq(), None, staged=True, monkeypatch=monkeypatch, edit=doubled_mlp)
    plain, plain_logits = quantize(2, gptq(), None, staged=False, monkeypatch=monkeypatch, edit=doubled_mlp)
    for n in plain.blocks[0].qweights:
        assert torch.equal(staged.blocks[0].qweights[n].codes, plain.blocks[0].qweights[n].codes), n
    torch.testing.assert_close(logits, plain_logits)


def test_possible_only_for_attention_and_mlp_submodules():
    s = random_block(0).structure
    assert BlockStages(s).possible
    assert not BlockStages(dataclasses.replace(s, o="o_proj")).possible  # o_proj outside the attention module
    assert not BlockStages(dataclasses.replace(s, gate="self_attn.gate_proj")).possible


@pytest.mark.parametrize("sequential", [True, False])
def test_out_of_memory_in_a_true_sequential_block_suggests_one_pass(sequential, monkeypatch):
    from qnpu.models.engine import LayerwiseCalibration

    def no_memory(*args, **kwargs):
        raise MemoryError("simulated")

    monkeypatch.setattr(LayerwiseCalibration, "_propagate", no_memory)
    model, ids = llama_of_block(random_block(3, batch=8, seq=16))
    with pytest.raises(MemoryError, match="block 0") as err:
        quantize_model(model, chain(quant_specs(weight=W3), gptq()), ids, progress=False, true_sequential=sequential)
    assert ("--no-true-sequential" in str(err.value)) == sequential
