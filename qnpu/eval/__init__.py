"""Evaluation: perplexity on the committed protocol slices (more metrics join here later)."""
from qnpu.eval.perplexity import WINDOW, perplexity, slice_perplexity, tokenize_slice

__all__ = ["WINDOW", "perplexity", "slice_perplexity", "tokenize_slice"]
