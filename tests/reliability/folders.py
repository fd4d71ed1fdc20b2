"""Tiny random Llama folders on disk for the reliability tests (optionally with tensors removed)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM


def llama_folder(path: Path, *, tied: bool = True, vocab: int = 128, drop: tuple[str, ...] = (),
                 tokenizer=None, seed: int = 0) -> Path:
    """Save a 2-block random Llama (hidden 32) to ``path``, then delete the ``drop`` tensors from
    its safetensors file (a damaged or incomplete download)."""
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    if drop:
        weights = path / "model.safetensors"
        tensors = load_file(str(weights))
        for name in drop:
            del tensors[name]
        save_file(tensors, str(weights), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
