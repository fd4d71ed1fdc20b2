"""The functional block equals Hugging Face's LlamaDecoderLayer on the same weights."""
import pytest
import torch

from qnpu.testing import random_block
from qnpu.transforms.block import block_forward


@pytest.mark.parametrize("bias, kv", [(False, 2), (True, 4), (False, 1)])
def test_block_matches_transformers_llama_layer(bias, kv):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    view = random_block(3, bias=bias, num_kv_heads=kv)
    s = view.structure
    cfg = transformers.LlamaConfig(hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                                   num_attention_heads=s.num_heads, num_key_value_heads=s.num_kv_heads,
                                   head_dim=s.head_dim, rms_norm_eps=s.norm_eps, rope_theta=s.rope_theta,
                                   attention_bias=bias, attn_implementation="eager")
    layer = LlamaDecoderLayer(cfg, layer_idx=0).eval()
    missing, unexpected = layer.load_state_dict(dict(view.params), strict=False)
    assert not unexpected and not [m for m in missing if not m.endswith("o_proj.bias")]
    x = view.inputs
    pos = torch.arange(x.shape[1])[None]
    rope = LlamaRotaryEmbedding(cfg)
    mask = torch.full((x.shape[1], x.shape[1]), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        ref = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=rope(x, pos))
    ref = ref[0] if isinstance(ref, tuple) else ref
    params = {k: v for k, v in view.params.items() if k in layer.state_dict()}
    ours = block_forward(params, s, x)
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
