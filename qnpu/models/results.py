"""What the calibration engine returns: one `BlockResult` per block and the `QuantizeResult`."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from qnpu.transforms import LinearSpec


def replaced_linears(specs: Mapping[str, LinearSpec | None], online_hadamard: tuple) -> tuple[str, ...]:
    """The linears the engine turns into `QLinear`: those with a weight or activation spec or an
    online Hadamard rotation of their input."""
    names = dict.fromkeys(list(specs) + list(online_hadamard))
    return tuple(n for n in names if n in online_hadamard or (
        specs.get(n) is not None and (specs[n].weight is not None or specs[n].activation is not None)))


@dataclass
class BlockResult:
    """What one block's calibration produced (``params`` / ``qweights`` / ``act_qparams`` on the block's own device).

    specs:        final `LinearSpec` per linear (block-relative names).
    state:        the recipe's state pytree for this block.
    params:       the block's final params by block-relative name (QLinear weights are the
                  dequantized values); empty in results that `quantize_from_disk` returns.
    qweights:     linear name -> quantized weight (`QTensor`, `BiLLMTensor` or `MixedTensor`), from
                  every `WeightsState` in the state: the one channel every rounder uses.
    act_qparams:  linear name -> static ``(scale, zero_point)`` of its input.
    output_error: ``||y - y_q|| / ||y||`` of the block on the calibration inputs (a true-sequential
                  block: on the first batch of them; a data-free run: on the error sample).
    linear_errors: linear name -> relative output error on its token sample (module docstring).
    """

    index: int
    prefix: str
    specs: dict
    online_hadamard: tuple
    state: Any
    params: dict
    seconds: float
    output_error: float
    linear_errors: dict
    qweights: dict = field(default_factory=dict)
    act_qparams: dict = field(default_factory=dict)

    @property
    def quantized_linears(self) -> tuple[str, ...]:
        """Linears that became `QLinear`: a weight or activation spec, or an online Hadamard."""
        return replaced_linears(self.specs, self.online_hadamard)

    def checkpoint_payload(self) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
        """``(tensors, qlinears)`` in the form ``CheckpointWriter.add`` takes, labels qualified
        with the block prefix. Linears with a quantized weight are stored as codes (their float
        weight is left out of ``tensors``); activation-only / online-Hadamard ones keep their float
        weight and get a ``qlinears`` entry with ``qweight=None``."""
        qlinears = {}
        for name in self.quantized_linears:
            spec = self.specs.get(name)
            qlinears[self.prefix + name] = {
                "qweight": self.qweights.get(name), "act_spec": None if spec is None else spec.activation,
                "act_qparams": self.act_qparams.get(name), "online_hadamard": name in self.online_hadamard}
        tensors = {self.prefix + k: v for k, v in self.params.items()
                   if not (k.endswith(".weight") and k.removesuffix(".weight") in self.qweights)}
        return tensors, qlinears


@dataclass
class QuantizeResult:
    """model: the input model, modified in place (None from `quantize_from_disk`); blocks: one
    `BlockResult` per block; edges: the final embedding / final norm / lm_head tensors by full
    name (lm_head only when untied); config: the model's HF config dict after quantization
    (``tie_word_embeddings`` False when rotation untied the embeddings); rotated: whether the
    residual stream is rotated; data_free: whether the recipe read no calibration data (the blocks
    then ran on the error sample only); error_sample_tokens: token rows each linear's error was
    measured on; true_sequential: whether the blocks were calibrated group by group (`models.sequential`)."""

    model: Any
    blocks: list
    seconds: float
    rotated: bool
    edges: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    data_free: bool = False
    error_sample_tokens: int | None = None
    true_sequential: bool = False

    def linear_errors(self) -> list[tuple[str, float]]:
        """Every linear's relative output error (full labels), in model order."""
        return [(b.prefix + n, e) for b in self.blocks for n, e in b.linear_errors.items()]

    def worst_linears(self, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` linears (full labels) with the largest relative output error."""
        return sorted(self.linear_errors(), key=lambda item: -item[1] if item[1] == item[1] else -math.inf)[:k]

