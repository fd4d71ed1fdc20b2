"""Per-family structure tables: where a Hugging Face causal LM keeps its blocks, edges and linears.

A `Family` is data (docs/architecture.md, "Adding a model family"): module paths only, no code. Everything the transforms
need about a block (smoothing pairs, rotation sites, the online-rotation point) follows from the
`qnpu.transforms.BlockStructure` that `block_structure` builds from a family's ``roles`` and the
model config: ``norm_pairs`` (RMSNorm -> the linears that read it), ``linear_pairs`` (v -> o,
up -> down), ``residual_readers`` / ``residual_writers`` and ``down`` (QuaRot's online Hadamard).

Supported: Llama, Mistral, Qwen2/2.5 (biases on q/k/v), Qwen3 (per-head RMSNorms ``q_norm`` /
``k_norm``) and openPangu-Embedded (Llama with biases on q/k/v/o). openPangu-Embedded ships its
own modeling code (``model_type`` "PanguEmbedded", config class ``PanguEmbeddedConfig``); its
config uses Llama's field names plus ``bias`` (q/k/v/o biases), so `to_llama_config` maps it onto
transformers' ``LlamaConfig(attention_bias=bias)`` and the checkpoint loads into
``LlamaForCausalLM`` without ``trust_remote_code`` (module names are Llama's).

A new Llama-style family is one more `Family` row plus a tiny-config test.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from qnpu.transforms import BlockStructure

LINEAR_ROLES = ("q", "k", "v", "o", "gate", "up", "down")
NORM_ROLES = ("attn_norm", "mlp_norm")
OPTIONAL_ROLES = ("q_norm", "k_norm")

LLAMA_ROLES = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
}
QK_NORM_ROLES = {**LLAMA_ROLES, "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"}


@dataclass(frozen=True, kw_only=True)
class Family:
    """Where one architecture keeps its tensors.

    name:        short family name (``"llama"``).
    model_types: the ``config.model_type`` values it serves.
    layers:      path of the ``nn.ModuleList`` of decoder blocks.
    embed, final_norm, lm_head: the model's edges (paths of modules).
    roles:       block role -> module path relative to a block, for the roles of
                 `qnpu.transforms.BlockStructure`: linears q, k, v, o, gate, up, down; RMSNorms
                 attn_norm, mlp_norm; optional per-head RMSNorms q_norm, k_norm.
    biases:      linear roles that carry a bias in the family's checkpoints (informational; the
                 engine handles any bias it finds).
    """

    name: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    roles: Mapping[str, str] = field(default_factory=lambda: dict(LLAMA_ROLES))
    biases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        allowed = set(LINEAR_ROLES + NORM_ROLES + OPTIONAL_ROLES)
        missing = [r for r in LINEAR_ROLES + NORM_ROLES if r not in self.roles]
        unknown = sorted(set(self.roles) - allowed)
        if missing or unknown:
            raise ValueError(f"Family {self.name!r}: roles missing {missing} / unknown {unknown}; "
                             f"allowed roles: {sorted(allowed)}")
        if ("q_norm" in self.roles) != ("k_norm" in self.roles):
            raise ValueError(f"Family {self.name!r}: q_norm and k_norm come together")
        bad = [b for b in self.biases if b not in LINEAR_ROLES]
        if bad:
            raise ValueError(f"Family {self.name!r}: biases {bad} are not linear roles {LINEAR_ROLES}")

    @property
    def linears(self) -> tuple[str, ...]:
        """Block-relative paths of every linear, in `BlockStructure.linears` order."""
        return tuple(self.roles[r] for r in LINEAR_ROLES)

    def table(self) -> dict:
        """The family's full structure table as plain data (block-relative module paths): every
        linear, the smoothing pairs (norm -> q/k/v, norm -> gate/up, v -> o, up -> down), the
        residual rotation sites (readers rotate their input, writers their output), the per-head
        rotation pair and the online-rotation point, as the transforms use them."""
        s = BlockStructure(hidden_size=1, intermediate_size=1, num_heads=1, num_kv_heads=1, head_dim=1,
                           **dict(self.roles))
        return {"name": self.name, "model_types": list(self.model_types), "layers": self.layers,
                "edges": {"embed": self.embed, "final_norm": self.final_norm, "lm_head": self.lm_head},
                "linears": list(s.linears), "biases": [self.roles[r] for r in self.biases],
                "qk_norms": [n for n in (s.q_norm, s.k_norm) if n],
                "smoothing_pairs": [[a, list(b)] for a, b in s.norm_pairs + s.linear_pairs],
                "rotation": {"residual_readers": list(s.residual_readers),
                             "residual_writers": list(s.residual_writers),
                             "per_head": [s.v, s.o], "online_hadamard": [s.down]}}


FAMILIES: tuple[Family, ...] = (
    Family(name="llama", model_types=("llama",)),
    Family(name="mistral", model_types=("mistral",)),
    Family(name="qwen2", model_types=("qwen2",), biases=("q", "k", "v")),
    Family(name="qwen3", model_types=("qwen3",), roles=dict(QK_NORM_ROLES)),
    Family(name="openpangu-embedded", model_types=("PanguEmbedded", "openpangu_dense"),
           biases=("q", "k", "v", "o")),
)
PANGU_MODEL_TYPES = ("PanguEmbedded", "openpangu_dense")


def _model_type(config: Any) -> str | None:
    return config.get("model_type") if isinstance(config, Mapping) else getattr(config, "model_type", None)


def _field(config: Any, key: str, default: Any = None) -> Any:
    value = config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)
    return default if value is None else value


def supported_model_types() -> tuple[str, ...]:
    return tuple(t for f in FAMILIES for t in f.model_types)


def family_for(config: Any) -> Family:
    """The `Family` of a Hugging Face config (object or ``config.json`` dict), by ``model_type``."""
    model_type = _model_type(config)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    listing = "; ".join(f"{f.name} ({', '.join(f.model_types)})" for f in FAMILIES)
    raise ValueError(f"unsupported architecture: model_type={model_type!r}. Supported families "
                     f"(model types): {listing}. A Llama-style architecture needs one Family row in "
                     "qnpu/models/families.py")


def rope_theta(config: Any) -> float:
    """RoPE base from ``rope_parameters["rope_theta"]`` (transformers >= 5) or ``rope_theta``."""
    params = _field(config, "rope_parameters")
    if isinstance(params, Mapping) and params.get("rope_theta") is not None:
        return float(params["rope_theta"])
    return float(_field(config, "rope_theta", 10000.0))


def block_structure(config: Any) -> BlockStructure:
    """`BlockStructure` of one decoder block: sizes and heads from the config, module names from
    the family's roles. ``head_dim`` is ``config.head_dim`` when set (Qwen3 decouples it from
    hidden / heads), else ``hidden_size // num_attention_heads``.

    `block_forward` (used by searches that score a whole block) applies plain RoPE with this
    ``rope_theta``; a scaled RoPE (``rope_type`` other than "default") makes those scores approximate,
    while the engine itself always runs the model's own modules."""
    family = family_for(config)
    hidden = int(_field(config, "hidden_size"))
    heads = int(_field(config, "num_attention_heads"))
    return BlockStructure(
        hidden_size=hidden,
        intermediate_size=int(_field(config, "intermediate_size")),
        num_heads=heads,
        num_kv_heads=int(_field(config, "num_key_value_heads", heads)),
        head_dim=int(_field(config, "head_dim", hidden // heads)),
        norm_eps=float(_field(config, "rms_norm_eps", 1e-6)),
        rope_theta=rope_theta(config),
        **dict(family.roles),
    )


# -- openPangu-Embedded without trust_remote_code -------------------------------------------------
_PANGU_ONLY = ("model_type", "architectures", "auto_map", "bias", "transformers_version")


def to_llama_config(config_dict: Mapping[str, Any]):
    """A transformers ``LlamaConfig`` equivalent to an openPangu-Embedded ``config.json``.

    openPangu-Embedded's ``PanguEmbeddedConfig`` has Llama's field names (vocab_size, hidden_size,
    intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads, hidden_act,
    max_position_embeddings, rms_norm_eps, rope_theta, tie_word_embeddings, token ids) plus
    ``bias`` (default True): q/k/v/o carry biases, the MLP none. That is ``LlamaConfig`` with
    ``attention_bias=bias`` and ``mlp_bias=False``; the modules are named as in Llama, so the
    checkpoint's tensors load into ``LlamaForCausalLM`` as they are. Fields the mapping does not
    know are passed through (``LlamaConfig`` keeps unknown keys as attributes).
    """
    from transformers import LlamaConfig

    if _model_type(config_dict) not in PANGU_MODEL_TYPES:
        raise ValueError(f"to_llama_config: model_type={_model_type(config_dict)!r} is not "
                         f"openPangu-Embedded ({', '.join(PANGU_MODEL_TYPES)})")
    fields = {k: v for k, v in config_dict.items() if k not in _PANGU_ONLY}
    fields["attention_bias"] = bool(config_dict.get("bias", True))
    fields["mlp_bias"] = False
    fields["architectures"] = ["LlamaForCausalLM"]
    # PanguEmbeddedConfig's own defaults where the file omits a field and Llama's default differs.
    fields.setdefault("rms_norm_eps", 1e-5)
    fields.setdefault("tie_word_embeddings", False)
    return LlamaConfig(**fields)


def hf_config(config_dict: Mapping[str, Any]):
    """The transformers config to build a model from a ``config.json`` dict: openPangu-Embedded
    via `to_llama_config`, other supported families via ``AutoConfig.for_model``."""
    from transformers import AutoConfig

    family = family_for(config_dict)
    if family.name == "openpangu-embedded":
        return to_llama_config(config_dict)
    fields = {k: v for k, v in config_dict.items() if k != "model_type"}
    return AutoConfig.for_model(config_dict["model_type"], **fields)
