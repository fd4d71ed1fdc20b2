"""Structure tables: every family's table names every linear of its blocks, the BlockStructure
matches the config, and smoothing / rotation through the engine keep a whole model's logits."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from qnpu.qcore import QSpec
from qnpu.transforms import chain, hadamard_rotation, quant_specs, recipe_to_dict, smoothquant
from qnpu.models.checkpoint import CheckpointWriter
from qnpu.models.engine import quantize_model
from qnpu.models.families import FAMILIES, Family, block_structure, family_for, hf_config, to_llama_config
from qnpu.models.lazy import quantize_from_disk
from qnpu.models.saving import load_quantized

SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
PANGU = {"model_type": "PanguEmbedded", "architectures": ["PanguEmbeddedForCausalLM"], "bias": True,
         "auto_map": {"AutoConfig": "configuration_openpangu_dense.PanguEmbeddedConfig"},
         "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 16000000.0, "tie_word_embeddings": False,
         "torch_dtype": "float32", **SIZES}
DYNAMIC = QSpec(bits=8, granularity="token", dynamic=True)


def configs():
    return {
        "llama": LlamaConfig(**SIZES, tie_word_embeddings=True),
        "mistral": MistralConfig(**SIZES),
        "qwen2": Qwen2Config(**SIZES),
        "qwen3": Qwen3Config(**SIZES, head_dim=16),
        "openpangu-embedded": to_llama_config(PANGU),
    }


def tiny_model(config, seed: int = 0) -> nn.Module:
    """A seeded random model whose norms and biases are not trivial (so folding them matters)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model


def ids(n: int = 4, seq: int = 16, vocab: int = SIZES["vocab_size"]) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(7))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).double().norm() / b.double().norm())


@pytest.mark.parametrize("name", list(configs()))
def test_table_covers_every_linear_and_norm_of_a_block(name):
    config = configs()[name]
    family = family_for(config)
    model = tiny_model(config)
    block = model.get_submodule(family.layers)[0]
    linears = {n for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    assert linears == set(family.linears)
    s = block_structure(config)
    assert s.linears == family.linears
    for role in ("attn_norm", "mlp_norm", "q_norm", "k_norm"):
        if role in family.roles:
            assert isinstance(block.get_submodule(family.roles[role]).weight, nn.Parameter)
            assert getattr(s, role) == family.roles[role]
    for edge in (family.embed, family.final_norm, family.lm_head):
        assert model.get_submodule(edge).weight is not None
    with_bias = {n.removesuffix(".bias") for n, _ in block.named_parameters() if n.endswith(".bias")}
    table = family_for(PANGU) if name == "openpangu-embedded" else family  # Pangu runs as Llama
    assert table.name == name and table.linears == family.linears
    assert with_bias == {table.roles[r] for r in table.biases}
    # the rendered table names modules that exist, with the pairs wired by data flow
    t = table.table()
    assert set(t["linears"]) == linears and set(t["biases"]) == with_bias
    pairs = dict((a, tuple(b)) for a, b in t["smoothing_pairs"])
    assert pairs[family.roles["attn_norm"]] == tuple(family.roles[r] for r in ("q", "k", "v"))
    assert pairs[family.roles["mlp_norm"]] == (family.roles["gate"], family.roles["up"])
    assert pairs[family.roles["v"]] == (family.roles["o"],) and pairs[family.roles["up"]] == (family.roles["down"],)
    for module in list(pairs) + t["qk_norms"] + [m for ms in t["rotation"].values() for m in ms]:
        block.get_submodule(module)
    assert set(t["rotation"]["residual_readers"]) | set(t["rotation"]["residual_writers"]) == linears
    assert t["rotation"]["online_hadamard"] == [family.roles["down"]]


@pytest.mark.parametrize("name", list(configs()))
def test_block_structure_matches_the_config(name):
    config = configs()[name]
    s = block_structure(config)
    block = tiny_model(config).get_submodule(family_for(config).layers)[0]
    assert (s.hidden_size, s.intermediate_size, s.num_heads, s.num_kv_heads) == (64, 128, 4, 2)
    assert block.get_submodule(s.q).weight.shape == (s.num_heads * s.head_dim, s.hidden_size)
    assert block.get_submodule(s.k).weight.shape == (s.num_kv_heads * s.head_dim, s.hidden_size)
    assert s.norm_eps == config.rms_norm_eps
    assert (s.q_norm is not None) == (name == "qwen3")
    assert s.down == "mlp.down_proj" and s.norm_pairs[0][1] == (s.q, s.k, s.v)


def test_pangu_config_maps_onto_llama_with_attention_biases():
    cfg = to_llama_config(PANGU)
    assert cfg.model_type == "llama" and cfg.attention_bias and not cfg.mlp_bias
    assert block_structure(PANGU).rope_theta == 16000000.0 == block_structure(cfg).rope_theta
    assert block_structure(PANGU).norm_eps == 1e-5
    assert family_for(PANGU).name == "openpangu-embedded" and family_for(cfg).name == "llama"
    with pytest.raises(ValueError, match="not openPangu"):
        to_llama_config({"model_type": "llama"})


def test_pangu_checkpoint_loads_and_quantizes_without_remote_code(tmp_path):
    model = tiny_model(to_llama_config(PANGU))
    model.save_pretrained(tmp_path, safe_serialization=True)
    (tmp_path / "config.json").write_text(json.dumps(PANGU))  # as shipped: PanguEmbedded, "bias"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, config=hf_config(PANGU)).eval()
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    got = []
    recipe = chain(hadamard_rotation(seed=1))
    result = quantize_from_disk(tmp_path, recipe, x, on_block=got.append, progress=False)
    assert len(got) == 2 and "self_attn.o_proj.bias" in got[0].params and result.rotated
    # the streamed checkpoint keeps the raw openPangu config and still loads without remote code
    with CheckpointWriter(tmp_path / "q", source={"path": "pangu"}, recipe=recipe_to_dict(recipe),
                          hf_config=result.config) as writer:
        for block in got:
            writer.add(*block.checkpoint_payload())
        writer.add(result.edges)
        writer.close()
    reloaded = load_quantized(tmp_path / "q").eval()
    with torch.no_grad():
        assert relative(reloaded(x).logits, model(x).logits) < 1e-4  # rotation alone keeps the function


@pytest.mark.parametrize("name", list(configs()))
@pytest.mark.parametrize("recipe", [
    pytest.param(lambda: chain(quant_specs(activation=DYNAMIC), smoothquant(alpha=0.6, pairs="all"),
                               quant_specs(activation=None)), id="smooth-all"),
    pytest.param(lambda: chain(quant_specs(activation=DYNAMIC), smoothquant(alpha=0.5, pairs="norms"),
                               quant_specs(activation=None)), id="smooth-norms"),
    pytest.param(lambda: chain(hadamard_rotation(seed=5)), id="rotate"),
    pytest.param(lambda: chain(quant_specs(activation=DYNAMIC), smoothquant(pairs="all"),
                               hadamard_rotation(seed=2, kind="orthogonal"), quant_specs(activation=None)),
                 id="smooth-then-rotate"),
])
def test_smoothing_and_rotation_keep_the_logits(name, recipe):
    model = tiny_model(configs()[name], seed=3)
    x = ids()
    q_before = model.get_submodule("model.layers.0.self_attn.q_proj").weight.detach().clone()
    with torch.no_grad():
        reference = model(x).logits
    result = quantize_model(model, recipe(), x, batch_size=3, progress=False)
    with torch.no_grad():
        out = model(x).logits
    assert relative(out, reference) < 1e-4
    assert all(b.output_error < 1e-4 for b in result.blocks)
    # the recipe really transformed the weights (scaled or rotated), it did not just skip them
    assert not torch.equal(result.blocks[0].params["self_attn.q_proj.weight"], q_before)


def test_unsupported_architecture_names_the_supported_families():
    with pytest.raises(ValueError, match=r"model_type='gpt2'.*llama.*qwen3.*PanguEmbedded"):
        family_for(GPT2Config())
    with pytest.raises(ValueError, match="unsupported architecture"):
        family_for({"model_type": "gemma"})
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="unsupported architecture"):
        quantize_model(model, chain(hadamard_rotation()), ids(vocab=64), progress=False)


def test_family_rows_are_validated():
    assert len({t for f in FAMILIES for t in f.model_types}) == sum(len(f.model_types) for f in FAMILIES)
    with pytest.raises(ValueError, match="roles missing"):
        Family(name="bad", model_types=("bad",), roles={"q": "q_proj"})
    with pytest.raises(ValueError, match="q_norm and k_norm"):
        Family(name="bad", model_types=("bad",), roles={**FAMILIES[0].roles, "q_norm": "self_attn.q_norm"})
