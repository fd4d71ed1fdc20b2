"""A one-layer Hugging Face Llama that runs a `qnpu.testing.random_block` on its own inputs.

The embedding holds the block's input rows and the token ids are ``0 .. b*t-1``, so layer 0 sees
exactly ``view.inputs`` and the engine calibrates the random block with its realistic, correlated,
outlier-bearing activations."""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qnpu.transforms import BlockView


def llama_of_block(view: BlockView) -> tuple[LlamaForCausalLM, torch.Tensor]:
    """``(model, ids)``: layer 0 of ``model`` has ``view.params``, its inputs on ``ids`` are ``view.inputs``."""
    s, x = view.structure, view.inputs
    b, t, hidden = x.shape
    config = LlamaConfig(hidden_size=hidden, intermediate_size=s.intermediate_size, num_hidden_layers=1,
                         num_attention_heads=s.num_heads, num_key_value_heads=s.num_kv_heads, head_dim=s.head_dim,
                         vocab_size=b * t, max_position_embeddings=t, rms_norm_eps=s.norm_eps,
                         attention_bias=f"{s.q}.bias" in view.params, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        layer = model.model.layers[0]
        for key, value in view.params.items():
            layer.get_parameter(key).copy_(value)
        model.get_input_embeddings().weight.copy_(x.reshape(b * t, hidden))
    return model, torch.arange(b * t).view(b, t)
