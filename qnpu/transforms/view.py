"""The data a transform sees: one decoder block's params, structure, statistics and specs.

Everything here is plain data (NamedTuples and frozen dataclasses of tensors, strings and
numbers); `qnpu.models` builds it from real modules, tests build it from random tensors.

Naming: linears are named relative to the block (``"self_attn.q_proj"``); their tensors live in
``params`` under ``"<name>.weight"`` ([out, in]) and ``"<name>.bias"``; norms under
``"<norm>.weight"``. A linear's *label*, used for routing, is ``view.prefix + name``
(e.g. ``"model.layers.3.mlp.down_proj"``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, NamedTuple

import torch

from qnpu.qcore import QSpec

from .checks import check_int


@dataclass(frozen=True, kw_only=True)
class BlockStructure:
    """Which tensors of a Llama-style decoder block do what (one instance per model family/config).

    Block math (pre-norm): ``h = x + o(attn(q(n1(x)), k(n1(x)), v(n1(x))))``,
    ``y = h + down(silu(gate(n2(h))) * up(n2(h)))`` with RMSNorms ``n1``, ``n2`` and RoPE on q/k;
    ``q_norm``/``k_norm`` (Qwen3) are per-head RMSNorms on q and k before RoPE.
    """

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    q_norm: str | None = None
    k_norm: str | None = None
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim"):
            check_int("BlockStructure", name, getattr(self, name))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"BlockStructure: num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")

    @property
    def linears(self) -> tuple[str, ...]:
        return (self.q, self.k, self.v, self.o, self.gate, self.up, self.down)

    @property
    def norm_pairs(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """(RMSNorm, the linears that read its output): where norm scales fold and smoothing goes."""
        return ((self.attn_norm, (self.q, self.k, self.v)), (self.mlp_norm, (self.gate, self.up)))

    @property
    def linear_pairs(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """(linear, the linear that reads its output linearly): v -> o (through attention), up -> down."""
        return ((self.v, (self.o,)), (self.up, (self.down,)))

    @property
    def residual_readers(self) -> tuple[str, ...]:
        return (self.q, self.k, self.v, self.gate, self.up)

    @property
    def residual_writers(self) -> tuple[str, ...]:
        return (self.o, self.down)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> "BlockStructure":
        return cls(**data)


class LinearStats(NamedTuple):
    """Calibration statistics of one linear's *input* ``X [n, in]`` (after all earlier transforms).

    hessian:  ``X^T X / n`` ([in, in], float32), the GPTQ proxy Hessian (Frantar et al. 2022).
    absmax:   ``max_n |X[n, j]|`` per input channel ([in]).
    tokens:   a sample of rows of ``X`` ([m, in]) for searches that need real activations.
    fp_tokens: the float model's input rows for the same tokens (GPTAQ), or None.
    fp_cross: ``(X_fp - X)^T X / n`` ([in, in]) for GPTAQ (Li et al. 2025), or None.
    """

    hessian: torch.Tensor | None = None
    absmax: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    fp_tokens: torch.Tensor | None = None
    fp_cross: torch.Tensor | None = None


class LinearSpec(NamedTuple):
    """Quantization specs of one linear: weight ([out, in]) and input activation (None: float).

    weight_qparams: ``(scale, zero_point)`` in the natural shape of the weight spec, fixed by a
    scale search (MSE, percentile, AWQ clipping); weight rounders use them instead of absmax /
    min-max. `BlockView.with_params` drops them when the weight changes, so they never go stale.
    """

    weight: QSpec | None = None
    activation: QSpec | None = None
    weight_qparams: tuple | None = None


class BlockView(NamedTuple):
    """What one transform step receives and returns (a new view; inputs are never mutated).

    targets: the linears this step acts on (narrowed by `masked` / `partition`).
    inputs:  a sample of the block's input hidden states ``[b, t, hidden]`` or None, for searches
             that score the whole block's output.
    online_hadamard: linears whose input the runtime multiplies by a normalized Hadamard matrix
             (set by `hadamard_rotation`); every later `block_forward` must pass it on.
    """

    params: Mapping[str, torch.Tensor]
    structure: BlockStructure
    stats: Mapping[str, LinearStats]
    specs: Mapping[str, LinearSpec]
    targets: tuple[str, ...]
    prefix: str = ""
    inputs: torch.Tensor | None = None
    online_hadamard: tuple[str, ...] = ()

    def label(self, name: str) -> str:
        return self.prefix + name

    def weight(self, name: str) -> torch.Tensor:
        return self.params[f"{name}.weight"]

    def bias(self, name: str) -> torch.Tensor | None:
        return self.params.get(f"{name}.bias")

    def with_params(self, updates: Mapping[str, torch.Tensor]) -> "BlockView":
        """New params; linears whose weight changed lose stale ``weight_qparams``."""
        specs = dict(self.specs)
        for key in updates:
            name = key.removesuffix(".weight")
            if key.endswith(".weight") and specs.get(name) is not None and specs[name].weight_qparams is not None:
                specs[name] = specs[name]._replace(weight_qparams=None)
        return self._replace(params={**self.params, **updates}, specs=specs)

    def with_stats(self, updates: Mapping[str, LinearStats]) -> "BlockView":
        return self._replace(stats={**self.stats, **updates})

    def with_specs(self, updates: Mapping[str, LinearSpec]) -> "BlockView":
        return self._replace(specs={**self.specs, **updates})


def make_view(params: Mapping[str, torch.Tensor], structure: BlockStructure,
              stats: Mapping[str, LinearStats] | None = None, *, prefix: str = "",
              inputs: torch.Tensor | None = None) -> BlockView:
    """A view over every linear of the block, with no specs yet."""
    missing = [f"{n}.weight" for n in structure.linears if f"{n}.weight" not in params]
    if missing:
        raise ValueError(f"block params lack {missing}; the structure expects {list(structure.linears)}")
    return BlockView(dict(params), structure, dict(stats or {}), {}, structure.linears, prefix, inputs)


class TransformError(ValueError):
    """A transform cannot serve this layer; the message names transform, layer and fix."""


def fail(transform: str, view: BlockView, name: str, problem: str, fix: str) -> None:
    raise TransformError(f"{transform}: layer {view.label(name)}: {problem}. Fix: {fix}")
