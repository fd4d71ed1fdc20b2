"""Built-in recipes: the settings of the two source papers, each one ``chain(...)`` line.

``get(name, group_size=None)`` returns the recipe; ``names()`` lists them; ``describe(name)``
gives a one-line summary; ``load(path)`` reads a recipe saved as JSON or YAML
(`qnpu.transforms.recipe_to_dict` writes that form). Weights are per-channel unless
``group_size`` is given; a group size that does not divide a layer's input width fails at that
layer with the fix (576 / 128 on SmolLM2, for instance: use 64 or 32). ``billm`` and ``slim-llm``
have their own column groups (each with its own scales): ``group_size`` sets those (default 128
for BiLLM's blocks, 64 for SliM-LLM's groups), and the weight spec itself stays per-channel.
``w4a16-hqq`` is grouped by default (64, the HQQ library's default): per-channel, its lp-error zero
points lose to plain symmetric RTN on the default model (docs / code 30.282 / 18.785 vs 24.454 /
15.928; at groups of 64, 15.936 / 10.179 vs RTN's 18.830 / 11.307).

``w8a8-dynamic`` rotates offline (QuaRot's residual and per-head rotations folded into the weights,
Ashkboos et al. 2024) so per-token int8 activations lose little, with nothing to run at inference
beyond a standard W8A8-dynamic matmul (the embedding and lm_head get untied). On the default model
with the shared protocol (128 x 512 calibration, 20,480 evaluation tokens per slice): +0.86% / +0.80%
perplexity (docs / code); SmoothQuant alpha 0.5 on all four pairs instead: +1.26% / +1.23%; no
smoothing at all: +2.8% / +3.5% (on 2,048 tokens). With the online Hadamard before down_proj and
SmoothQuant 0.5 on the norms it reaches +0.44% / +0.30%, at the price of an online rotation.

Activation specs: ``A8D`` is per-token dynamic symmetric int8 (``npu_dynamic_quant``); ``A8S`` is
static per-tensor symmetric int8 (``npu_quantize``). In ``w8a8``, down_proj keeps per-token
dynamic activations: its input range is ~12x the other linears' and static per-tensor scales
collapse accuracy there (msModelSlim's static configs skip down_proj for the same reason).
"""
from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Callable

from qnpu.qcore import QSpec

from .activations import activation_scales
from .awq import awq
from .base import QTransform, recipe_from_dict, registered_transforms
from .billm import billm
from .checks import check_int
from .combinators import chain, masked, quant_specs
from .gptaq import gptaq
from .gptq import gptq
from .hqq import hqq
from .rotation import hadamard_rotation
from .rounding import rtn
from .slim_llm import slim_llm
from .smoothing import smoothquant

A8D = QSpec(bits=8, granularity="token", dynamic=True)
A8S = QSpec(bits=8, granularity="tensor")


def _w(bits: int, group_size: int | None, *, symmetric: bool = True) -> QSpec:
    fmt = "int" if symmetric else "uint"
    # int8 keeps the Ascend grid (absmax -> 127); at 4 bits and below the full grid (absmax -> 7.5,
    # code -8 used) matters: w4a16-gptq docs/code ppl 24.64/10.76 -> 22.70/10.11 on 4,096 eval tokens.
    full = symmetric and bits <= 4
    if group_size is None:
        return QSpec(bits=bits, format=fmt, symmetric=symmetric, full_range=full)
    return QSpec(bits=bits, format=fmt, symmetric=symmetric, full_range=full, granularity="group",
                 group_size=group_size, axis=-1)


_RECIPES: dict[str, tuple[str, Callable[[int | None], QTransform]]] = {
    "w8a8": ("int8 per-channel weights (RTN), static per-tensor int8 activations after SmoothQuant 0.8; "
             "down_proj per-token dynamic",
             lambda g: chain(quant_specs(weight=_w(8, g), activation=A8S),
                             masked("*.mlp.down_proj", quant_specs(activation=A8D)),
                             smoothquant(alpha=0.8), activation_scales(), rtn())),
    "w8a8-dynamic": ("int8 per-channel weights (RTN), per-token dynamic int8 activations after an offline "
                     "random-Hadamard rotation (residual stream + per-head V/O; no online rotation)",
                     lambda g: chain(quant_specs(weight=_w(8, g), activation=A8D), hadamard_rotation(online=False),
                                     rtn())),
    "w8a16": ("int8 per-channel weights (RTN), float activations",
              lambda g: chain(quant_specs(weight=_w(8, g)), rtn())),
    "w4a16-rtn": ("int4 symmetric weights (full [-8, 7] grid), round-to-nearest", lambda g: chain(quant_specs(weight=_w(4, g)), rtn())),
    "w4a16-hqq": ("uint4 asymmetric weights in groups (default 64, HQQ's), HQQ float zero points (lp error, "
                  "p = 0.7; data-free), then RTN",
                  lambda g: chain(quant_specs(weight=_w(4, g or 64, symmetric=False).replace(zero_point_domain="float")),
                                  hqq(), rtn())),
    "w4a16-gptq": ("int4 symmetric weights, GPTQ (act-order; groups: static)",
                   lambda g: chain(quant_specs(weight=_w(4, g)), gptq())),
    "w4a16-awq": ("int4 symmetric weights, AWQ scales (q/k/v scored by the attention output, gate/up by the MLP "
                  "output) + clipping, then RTN",
                  lambda g: chain(quant_specs(weight=_w(4, g)), awq(), rtn())),
    "w4a16-gptaq": ("int4 symmetric weights, GPTAQ (asymmetric calibration against the float path)",
                    lambda g: chain(quant_specs(weight=_w(4, g)), gptaq())),
    "w3a16-gptq": ("int3 asymmetric weights, GPTQ",
                   lambda g: chain(quant_specs(weight=_w(3, g, symmetric=False)), gptq())),
    "w2a16-gptq": ("int2 asymmetric weights, GPTQ",
                   lambda g: chain(quant_specs(weight=_w(2, g, symmetric=False)), gptq())),
    "w4a8": ("int4 weights (GPTQ), per-token dynamic int8 activations",
             lambda g: chain(quant_specs(weight=_w(4, g), activation=A8D), gptq())),
    "w4a8-smoothquant": ("w4a8 after SmoothQuant with alpha searched by block output error",
                         lambda g: chain(quant_specs(weight=_w(4, g), activation=A8D), smoothquant(search=True),
                                         gptq())),
    "w4a8-hadamard": ("w4a8 after QuaRot random-Hadamard rotation (online Hadamard before down_proj)",
                      lambda g: chain(quant_specs(weight=_w(4, g), activation=A8D), hadamard_rotation(), gptq())),
    "billm": ("BiLLM ~1.1-bit binarization (salient residual + bell-shaped split)",
              lambda g: chain(quant_specs(weight=QSpec(bits=1, format="binary")), billm(block_size=g or 128))),
    "slim-llm": ("SliM-LLM 2-bit mixed-precision groups (1/2/3 bits, mean 2), asymmetric",
                 lambda g: chain(quant_specs(weight=_w(2, None, symmetric=False)), slim_llm(bits=2, group_size=g or 64))),
}


def names() -> tuple[str, ...]:
    return tuple(_RECIPES)


def describe(name: str) -> str:
    return _RECIPES[_check(name)][0]


def _check(name: str) -> str:
    if name not in _RECIPES:
        close = difflib.get_close_matches(name, _RECIPES, n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown recipe {name!r}{hint} Built-in recipes: {', '.join(_RECIPES)}")
    return name


def get(name: str, group_size: int | None = None) -> QTransform:
    """The built-in recipe ``name`` (per-channel weights, or groups of ``group_size`` along the input)."""
    check_int("recipes.get", "group_size", group_size, none="per-channel")
    return _RECIPES[_check(name)][1](group_size)


def load(path: str | Path) -> QTransform:
    """A recipe from a JSON or YAML file holding `recipe_to_dict` output. Every error is one line
    starting ``recipe file <path>:``: malformed text (with its line and column), an unknown transform
    anywhere in the tree (with the close registered names), a seed that is not an int >= 0, or
    what the transform itself refuses."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe file {path} does not exist")
    try:
        data = _read(path)
        if not isinstance(data, dict) or "transform" not in data:
            raise ValueError(f"it must hold one mapping with a 'transform' key (as recipe_to_dict writes); "
                             f"it holds {type(data).__name__ if not isinstance(data, dict) else 'a mapping without one'}")
        _check_entries(data, "the top level")
        return recipe_from_dict(data)
    except ValueError as err:  # name the file: the message names the parameter
        raise ValueError(f"recipe file {path}: {err}") from None


def _read(path: Path):
    """The parsed file; parse errors become one-line ValueErrors with the line and column."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8 text (byte {err.start} is {err.object[err.start:err.start + 1]!r})") from None
    if path.suffix not in (".yaml", ".yml"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        if mark is None:
            raise ValueError(f"not valid YAML: {' '.join(str(err).split())}") from None
        what = ", ".join(str(p) for p in (getattr(err, "context", None), err.problem) if p)
        raise ValueError(f"not valid YAML: {what} at line {mark.line + 1} column {mark.column + 1}") from None


def _check_entries(obj, where: str) -> None:
    """Every mapping with a 'transform' key names a registered transform, and its seed (if any) is
    an int >= 0: checked before anything is built, so the message says which entry is wrong (not
    "argument 0 is dict") and no seed is coerced (1.5 or "1" read as 1)."""
    if isinstance(obj, list):
        for i, item in enumerate(obj):
            _check_entries(item, f"{where}[{i}]" if where != "the top level" else f"[{i}]")
        return
    if not isinstance(obj, dict):
        return
    if "transform" in obj:
        name = obj["transform"]
        known = registered_transforms()
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.6)
            hint = f", did you mean {' or '.join(close)}?" if close else ""
            raise ValueError(f"unknown transform {name!r}{hint} (at {where}; registered transforms: "
                             f"{', '.join(known)})")
        check_int(name, "seed", obj.get("seed", 0), 0, hint=f"(at {where})")
    for key, value in obj.items():
        _check_entries(value, key if where == "the top level" else f"{where}.{key}")
