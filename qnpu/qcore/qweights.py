"""The quantized-weight types a rounder may produce, and how a packed one is rebuilt by name.

Every type has ``shape``, ``dtype``, ``spec``, ``packed_nbytes`` and ``dequantize(dtype)``:
`QTensor` (one grid per slice), `BiLLMTensor` (BiLLM's binarized planes) and `MixedTensor`
(SliM-LLM's groups of 1..8 bits). The last two are *packed layouts*: ``to_tensors()`` gives their
storage, ``layout_meta()`` its JSON description, and `packed_from_tensors` inverts both exactly.
"""
from __future__ import annotations

import torch

from .billm_tensor import BiLLMTensor
from .mixed_tensor import MixedTensor
from .qtensor import QTensor
from .spec import QSpec

PACKED_LAYOUTS = {cls.layout: cls for cls in (BiLLMTensor, MixedTensor)}
QWeight = QTensor | BiLLMTensor | MixedTensor
# every tensor-name suffix a packed layout stores
PACKED_SUFFIXES = ("sign", "residual_sign", "salient", "sparse", "scale", "offset", "codes", "group_bits",
                   "zero_point", "mean")


def is_packed(q) -> bool:
    """Whether ``q`` is a packed layout (not a `QTensor`)."""
    return isinstance(q, tuple(PACKED_LAYOUTS.values()))


def packed_from_tensors(layout: str, tensors: dict[str, torch.Tensor], meta: dict, spec: QSpec | None,
                        dtype: torch.dtype):
    """The `BiLLMTensor` / `MixedTensor` that ``to_tensors`` / ``layout_meta`` describe; ValueError
    for an unknown layout or tensors that do not fit it."""
    cls = PACKED_LAYOUTS.get(layout)
    if cls is None:
        raise ValueError(f"unknown weight layout {layout!r}; known: {sorted(PACKED_LAYOUTS)}")
    return cls.from_tensors(tensors, meta, spec, dtype)
