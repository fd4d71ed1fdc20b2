"""qnpu: functional post-training quantization for LLMs, lowered to Ascend NPUs."""
__version__ = "0.1.0"
