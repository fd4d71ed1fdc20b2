"""The layer-by-layer engine on tiny random Llama models: quantized linears replace nn.Linear, logits
stay close, statistics are X^T X / n of the real inputs, GPTQ beats RTN, GPTAQ gets the float path,
rotations keep the logits with tied embeddings, streaming from disk matches, errors name layers."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from qnpu.qcore import QSpec
from qnpu.models.checkpoint import Checkpoint, CheckpointWriter
from qnpu.models.capture import needs_float_path, needs_hessian
from qnpu.models.engine import quantize_model
from qnpu.models.results import BlockResult
from qnpu.models.lazy import quantize_from_disk
from qnpu.models.qlinear import QLinear
from qnpu.transforms import (
    EmptyState,
    QTransform,
    chain,
    hadamard_rotation,
    masked,
    quant_specs,
    recipe_to_dict,
    rtn,
)
from qnpu.transforms.activations import static_input_qparams
from qnpu.transforms.gptaq import gptaq
from qnpu.transforms.gptq import gptq

HIDDEN, VOCAB = 64, 128
DYNAMIC = QSpec(bits=8, granularity="token", dynamic=True)
W8A8 = lambda: chain(quant_specs(weight=QSpec(bits=8), activation=DYNAMIC), rtn())  # noqa: E731


def tiny_llama(layers: int = 2, *, tied: bool = False, seed: int = 0) -> LlamaForCausalLM:
    """Seeded random Llama whose embeddings have correlated channels and a few outlier channels
    (like real activations; with independent channels GPTQ has nothing to exploit)."""
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    model = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif "embed" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        mix = torch.randn(HIDDEN, HIDDEN, generator=g) / HIDDEN ** 0.5
        embed = torch.randn(VOCAB, HIDDEN, generator=g) @ mix
        embed[:, :2] *= 20.0
        model.get_input_embeddings().weight.copy_(embed)
    return model


def calibration(n: int = 8, seq: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(11))


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def relative(a, b) -> float:
    return float((a - b).double().norm() / b.double().norm())


def spy(seen: list, fail_at: int | None = None, error: type = MemoryError) -> QTransform:
    """A transform that records the views it gets (and can raise, to test error paths)."""

    def update(view, state):
        seen.append(view)
        if fail_at is not None and len(seen) - 1 == fail_at:
            raise error("simulated")
        return view, state

    return QTransform(lambda view: EmptyState(), update)


def test_w8a8_replaces_every_linear_and_keeps_logits_close():
    model, ids = tiny_llama(3), calibration()
    reference = logits(model, ids)
    streamed: list[BlockResult] = []
    result = quantize_model(model, W8A8(), ids, batch_size=3, progress=False, on_block=streamed.append)
    assert result.model is model and [b.index for b in streamed] == [0, 1, 2]
    assert relative(logits(model, ids), reference) < 0.05
    for i, block in enumerate(model.model.layers):
        linears = {n: m for n, m in block.named_modules() if isinstance(m, (nn.Linear, QLinear))}
        assert len(linears) == 7 and all(isinstance(m, QLinear) for m in linears.values())
        assert all(m.qweight.spec.bits == 8 and m.act_spec == DYNAMIC for m in linears.values())
        assert set(result.blocks[i].qweights) == set(linears)
        assert 0 < result.blocks[i].output_error < 0.05
        assert all(0 < e < 0.05 for e in result.blocks[i].linear_errors.values())
    in_model = [f"model.layers.{i}.{n}" for i, block in enumerate(model.model.layers)
                for n, m in block.named_modules() if isinstance(m, QLinear)]
    assert [label for label, _ in result.linear_errors()] == in_model  # every linear, in model order
    worst = result.worst_linears(5)
    assert len(worst) == 5 and worst[0][1] == max(e for b in result.blocks for e in b.linear_errors.values())
    assert worst[0][0].startswith("model.layers.")


def test_gptq_has_lower_linear_error_than_rtn_at_3_bits():
    spec = QSpec(bits=3)
    ids = calibration(n=12)
    errors = {}
    for name, rounder in (("rtn", rtn()), ("gptq", gptq(act_order=True))):
        result = quantize_model(tiny_llama(1), chain(quant_specs(weight=spec), rounder), ids, progress=False,
                                max_stat_tokens=512, error_tokens=512, error_sample=(12, 24))
        errors[name] = result.blocks[0].linear_errors  # block 0: both see the same inputs (all 12 x 24)
    assert sum(errors["gptq"].values()) < 0.9 * sum(errors["rtn"].values())
    assert all(errors["gptq"][n] < errors["rtn"][n] for n in errors["rtn"])


def test_gptaq_gets_the_float_path():
    ids = calibration()
    assert needs_float_path(chain(quant_specs(weight=QSpec(bits=4)), gptaq()))
    assert not needs_float_path(W8A8())
    spec = chain(quant_specs(weight=QSpec(bits=3)))
    # one pass per block (true_sequential=False): block 0's linears all see float inputs
    results = {name: quantize_model(tiny_llama(2), chain(spec, rounder), ids, progress=False, true_sequential=False)
               for name, rounder in (("gptq", gptq()), ("gptaq", gptaq(alpha=0.25)))}
    first = [r.blocks[0].qweights["mlp.down_proj"].codes for r in results.values()]
    later = [r.blocks[1].qweights["mlp.down_proj"].codes for r in results.values()]
    assert torch.equal(*first)  # block 0: float and quantized inputs agree, fp_cross = 0: GPTAQ == GPTQ
    assert not torch.equal(*later)  # block 1: the asymmetry correction changes the rounding

    seen: list = []
    model = tiny_llama(2)
    quantize_model(model, W8A8(), ids, progress=False)  # a quantized block 0 ...
    quantize_model(tiny_llama(2), spy(seen), ids, progress=False, float_path=True)
    st = seen[-1].stats["self_attn.q_proj"]  # block 1 (block 0 may also run on its first batch first)
    assert st.fp_cross is not None and st.fp_tokens is not None
    assert float(st.fp_cross.abs().max()) == 0.0  # ... but a float-only recipe: both paths agree
    seen.clear()
    lossy = QTransform(lambda v: EmptyState(), lambda v, s: (seen.append(v) or v.with_params(
        {"mlp.down_proj.weight": v.weight("mlp.down_proj") * 1.1}), s))
    quantize_model(tiny_llama(2), lossy, ids, progress=False, float_path=True)
    assert float(seen[-1].stats["self_attn.q_proj"].fp_cross.abs().max()) > 0.0


def test_the_hessian_is_collected_only_for_recipes_that_read_it():
    assert not needs_hessian(W8A8())
    assert not needs_hessian(chain(quant_specs(weight=QSpec(bits=4)), hadamard_rotation(seed=0), rtn()))
    assert needs_hessian(chain(quant_specs(weight=QSpec(bits=4)), masked("*.down_proj", gptq())))
    assert needs_hessian(spy([]))  # unregistered: may read anything
    seen: list = []
    record = QTransform(lambda v: EmptyState(), lambda v, s: (seen.append(v) or v, s))
    quantize_model(tiny_llama(1), record, calibration(), progress=False, hessian=False)
    assert all(st.hessian is None and st.absmax is not None for st in seen[0].stats.values())
    with pytest.raises(ValueError, match="Hessian"):  # a rounder that needs it says how to get it
        quantize_model(tiny_llama(1), chain(quant_specs(weight=QSpec(bits=4)), gptq()), calibration(),
                       progress=False, hessian=False)


def test_engine_stats_are_the_hessian_of_the_captured_inputs():
    model, ids = tiny_llama(2), calibration()
    captured: dict[str, list] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: captured.setdefault(n, []).append(inp[0]))
             for n, m in model.named_modules() if isinstance(m, nn.Linear) and "layers" in n]
    logits(model, ids)
    for h in hooks:
        h.remove()
    seen: list = []
    quantize_model(model, spy(seen), ids, batch_size=3, progress=False, max_stat_tokens=40, true_sequential=False)
    assert len(seen) == 2
    for i, view in enumerate(seen):
        assert view.prefix == f"model.layers.{i}." and view.inputs.shape == (4, 24, HIDDEN)
        for name, st in view.stats.items():
            x = torch.cat(captured[f"model.layers.{i}.{name}"]).reshape(-1, st.hessian.shape[0]).double()
            torch.testing.assert_close(st.hessian.double(), x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(st.absmax.double(), x.abs().amax(0))
            # a uniform fixed-seed sample over every calibration token, not the first sequence's rows
            keep = torch.sort(torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:40]).values
            torch.testing.assert_close(st.tokens.double(), x[keep])
            assert int(keep.max()) >= 24 * 4  # rows from later sequences too
            assert st.fp_cross is None


def test_rotation_keeps_logits_across_blocks_with_tied_embeddings():
    model, ids = tiny_llama(3, tied=True), calibration()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    reference = logits(model, ids)
    result = quantize_model(model, chain(hadamard_rotation(seed=4)), ids, progress=False)
    assert result.rotated and not model.config.tie_word_embeddings and not result.config["tie_word_embeddings"]
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert relative(logits(model, ids), reference) < 1e-4
    for block in model.model.layers:
        assert isinstance(block.mlp.down_proj, QLinear) and block.mlp.down_proj.online_hadamard
        assert isinstance(block.self_attn.q_proj, nn.Linear)  # float: offline rotation only
    torch.testing.assert_close(model.model.norm.weight, torch.ones(HIDDEN))
    # quantized on top of the rotation, still close
    model2 = tiny_llama(3, tied=True)
    quantize_model(model2, chain(hadamard_rotation(seed=4), W8A8()), ids, progress=False)
    assert relative(logits(model2, ids), reference) < 0.05


def test_checkpoint_payload_keeps_float_weights_of_activation_only_linears():
    result = quantize_model(tiny_llama(1), chain(hadamard_rotation(seed=2)), calibration(), progress=False)
    tensors, qlinears = result.blocks[0].checkpoint_payload()
    assert list(qlinears) == ["model.layers.0.mlp.down_proj"]  # float weights, online Hadamard only
    assert qlinears["model.layers.0.mlp.down_proj"]["qweight"] is None
    assert qlinears["model.layers.0.mlp.down_proj"]["online_hadamard"]
    assert "model.layers.0.mlp.down_proj.weight" in tensors and len(tensors) == 9


def test_rotation_must_reach_every_block():
    with pytest.raises(ValueError, match="every block"):
        quantize_model(tiny_llama(2), masked("model.layers.0.*", hadamard_rotation()), calibration(), progress=False)


def test_static_activation_scales_are_computed_when_the_recipe_has_none():
    static = QSpec(bits=8, granularity="tensor")
    model, ids = tiny_llama(1), calibration()
    result = quantize_model(model, chain(quant_specs(weight=QSpec(bits=8), activation=static), rtn()), ids,
                            progress=False)
    q = model.model.layers[0].self_attn.q_proj
    assert q.act_qparams is not None and not q.act_spec.dynamic
    seen: list = []
    quantize_model(tiny_llama(1), spy(seen), ids, progress=False)
    scale, _ = static_input_qparams(seen[0], "self_attn.q_proj", static)
    torch.testing.assert_close(result.blocks[0].act_qparams["self_attn.q_proj"][0], scale)


def test_from_disk_matches_in_memory(tmp_path):
    model, ids = tiny_llama(2, tied=True), calibration()
    model.save_pretrained(tmp_path / "float", safe_serialization=True)
    recipe = chain(hadamard_rotation(seed=1), quant_specs(weight=QSpec(bits=4, granularity="group", axis=-1,
                                                                          group_size=16),
                                                          activation=DYNAMIC), gptq())
    memory = quantize_model(copy.deepcopy(model), recipe, ids, batch_size=3, progress=False)
    streamed: list[BlockResult] = []
    disk = quantize_from_disk(tmp_path / "float", recipe, ids, on_block=streamed.append, batch_size=3,
                              progress=False)
    assert disk.model is None and disk.rotated and disk.config["tie_word_embeddings"] is False
    for a, b in zip(memory.blocks, streamed):
        assert a.params.keys() == b.params.keys()
        assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
        assert all(torch.equal(a.qweights[n].codes, b.qweights[n].codes) for n in a.qweights)
    assert all(not b.params and b.state is None for b in disk.blocks)  # memory freed after on_block
    assert disk.edges.keys() == memory.edges.keys()
    assert all(torch.equal(disk.edges[k], memory.edges[k]) for k in disk.edges)

    # stream the blocks into a checkpoint, as the CLI does, and read it back
    with CheckpointWriter(tmp_path / "q", source={"path": "tiny"}, recipe=recipe_to_dict(recipe),
                          hf_config=disk.config) as writer:
        for block in streamed:
            writer.add(*block.checkpoint_payload())
        writer.add(disk.edges)
        writer.close()
    ckpt = Checkpoint(tmp_path / "q")
    qlinears = ckpt.qlinears()
    assert len(qlinears) == 14 and qlinears["model.layers.1.mlp.down_proj"]["online_hadamard"]
    assert torch.equal(qlinears["model.layers.0.self_attn.q_proj"]["qweight"].codes,
                       streamed[0].qweights["self_attn.q_proj"].codes)
    assert "model.layers.0.input_layernorm.weight" in ckpt.float_tensors()


def test_nan_weight_error_names_the_layer():
    model = tiny_llama(2)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight has NaN"):
        quantize_model(model, W8A8(), calibration(), progress=False)


def test_nan_embedding_is_named_before_any_block_runs():
    model = tiny_llama(2)
    with torch.no_grad():
        model.get_input_embeddings().weight[5, 3] = float("inf")
    ids = calibration()
    ids[0, 0] = 5
    with pytest.raises(ValueError, match=r"model\.layers\.0 \(the output of model\.embed_tokens\) have NaN/Inf"):
        quantize_model(model, W8A8(), ids, progress=False)


def test_nan_in_the_model_head_is_named():
    model = tiny_llama(1)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"lm_head\.weight has NaN/Inf"):
        quantize_model(model, W8A8(), calibration(), progress=False)


def test_out_of_memory_names_the_block_and_what_to_lower():
    seen: list = []
    with pytest.raises(MemoryError, match=r"block 1 \(model\.layers\.1\).*--batch-size, now 3\)"):
        quantize_model(tiny_llama(2), spy(seen, fail_at=1), calibration(), batch_size=3, progress=False,
                       true_sequential=False)  # one recipe run per block
    with pytest.raises(RuntimeError, match=r"block 0 .*fewer calibration samples \(--samples\)"):
        quantize_model(tiny_llama(1), spy([], fail_at=0, error=lambda m: RuntimeError("CUDA out of memory")),
                       calibration(), progress=False)


def test_bad_arguments_fail_early():
    with pytest.raises(ValueError, match="batch_size"):
        quantize_model(tiny_llama(1), W8A8(), calibration(), batch_size=0, progress=False)
    with pytest.raises(ValueError, match="calibration_ids"):
        quantize_model(tiny_llama(1), W8A8(), torch.rand(2, 8), progress=False)
