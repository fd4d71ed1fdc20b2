"""The argument checks (`qnpu.transforms.checks`) and that every transform factory refuses bad
arguments through them: one message shape, naming the transform, the argument and what it may be."""
import math
import re

import pytest
import torch

from qnpu.transforms import (
    BlockStructure,
    awq,
    billm,
    gptaq,
    gptq,
    hadamard_rotation,
    hqq,
    masked,
    mse_scale_search,
    partition,
    percentile_scales,
    quant_specs,
    recipes,
    rtn,
    slim_llm,
    smoothquant,
)
from qnpu.transforms.checks import check_choice, check_flags, check_int, check_range
from qnpu.transforms.gptaq import gptaq_quantize
from qnpu.transforms.gptq import gptq_quantize
from qnpu.transforms.slim_llm import allocate_bits, mixed_gptq

SHAPE = dict(hidden_size=8, intermediate_size=16, num_heads=2, num_kv_heads=1, head_dim=4)


def _message(call) -> str:
    with pytest.raises(ValueError) as info:
        call()
    return str(info.value)


@pytest.mark.parametrize("value, ok", [(1, True), (7, True), (0, False), (8, False), (True, False), (2.0, False),
                                       ("3", False), (None, False)])
def test_check_int_takes_ints_in_range_only(value, ok):
    call = lambda: check_int("t", "bits", value, 1, 7)  # noqa: E731
    if ok:
        call()
    else:
        assert _message(call) == f"t: bits={value!r} is invalid; allowed: an int in 1..7"


def test_check_int_without_upper_bound_none_and_hint():
    assert _message(lambda: check_int("t", "n", 0, hint="(128 is the paper's)")) == \
        "t: n=0 is invalid; allowed: an int >= 1 (128 is the paper's)"
    check_int("t", "n", None, 0, none="all")
    assert _message(lambda: check_int("t", "n", -1, 0, none="all")) == \
        "t: n=-1 is invalid; allowed: an int >= 0 or None (all)"
    assert "None" in _message(lambda: check_int("t", "n", None, 0))  # None only where it means something


@pytest.mark.parametrize("kwargs, value, ok", [
    ({"lo": 0, "hi": 1}, 0, True), ({"lo": 0, "hi": 1}, 1, True), ({"lo": 0, "hi": 1}, 1.01, False),
    ({"lo": 0, "hi": 1, "open_lo": True}, 0, False), ({"lo": 0, "hi": 1, "open_lo": True}, 1e-9, True),
    ({"lo": 0, "hi": 1, "open_hi": True}, 1, False), ({"lo": 0, "hi": 1, "open_hi": True}, 0.999, True),
    ({"lo": 0}, math.inf, False), ({"lo": 0}, 1e300, True), ({"lo": 0}, -1e-9, False),
    ({"lo": 0, "open_lo": True}, 0, False), ({"lo": 0, "hi": 1}, math.nan, False), ({"lo": 0}, math.nan, False),
    ({"lo": 0, "hi": 1}, True, False), ({"lo": 0, "hi": 1}, "0.5", False), ({"lo": 0, "hi": 1}, None, False),
])
def test_check_range_bounds(kwargs, value, ok):
    call = lambda: check_range("t", "x", value, **kwargs)  # noqa: E731
    if ok:
        call()
    else:
        assert _message(call).startswith(f"t: x={value!r} is invalid; allowed: ")


def test_check_range_says_the_interval():
    assert _message(lambda: check_range("t", "x", 2, 0, 1, open_lo=True)).endswith("allowed: a number in (0, 1]")
    assert _message(lambda: check_range("t", "x", 2, 0, 0.5)).endswith("allowed: a number in [0, 0.5]")
    assert _message(lambda: check_range("t", "x", 0, 0, open_lo=True)).endswith("allowed: a finite number > 0")
    assert _message(lambda: check_range("t", "x", -1, 0, 0.5, none="search")).endswith(
        "allowed: a number in [0, 0.5] or None (search)")
    check_range("t", "x", None, 0, 0.5, none="search")


def test_check_flags_and_choice():
    check_flags("t", a=True, b=False)
    assert _message(lambda: check_flags("t", a=True, b=1)) == "t: b=1 is invalid; allowed: True | False"
    check_choice("t", "kind", "b", ("a", "b"))
    assert _message(lambda: check_choice("t", "kind", "c", ("a", "b"))) == \
        "t: kind='c' is invalid; allowed: 'a' | 'b'"
    assert "allowed" in _message(lambda: check_choice("t", "kind", ["a"], ("a", "b")))


# every factory (and the public cores) refuses through the checks: "<method>: <arg>=<value> is invalid; allowed: ...";
# a fourth entry is the "<arg>=<value>" shown when it is not the last keyword's (a list names its bad element)
REFUSALS = [
    (rtn, "rtn", {"rounding": "up"}),
    (gptq, "gptq", {"block_size": 0}), (gptq, "gptq", {"damp": math.inf}), (gptq, "gptq", {"act_order": 1}),
    (gptaq, "gptaq", {"alpha": -1.0}), (gptaq, "gptaq", {"static_groups": "no"}),
    (billm, "billm", {"salient_fraction": 0.7}), (billm, "billm", {"split_grid": 0}), (billm, "billm", {"damp": 0}),
    (billm, "billm", {"damp": math.inf}), (billm, "billm", {"mean_offsets": None}),
    (slim_llm, "slim_llm", {"bits": 8}), (slim_llm, "slim_llm", {"max_pairs": -1}),
    (slim_llm, "slim_llm", {"damp": math.nan}),
    (awq, "awq", {"grid": 0}), (awq, "awq", {"min_clip": 0}), (awq, "awq", {"score": "block"}),
    (awq, "awq", {"clip_qk": 1}),
    (smoothquant, "smoothquant", {"alpha": 1.5}), (smoothquant, "smoothquant", {"pairs": "linears"}),
    (smoothquant, "smoothquant", {"search": "yes"}), (smoothquant, "smoothquant", {"grid": [0.5, 2.0]}, "grid[1]=2.0"),
    (smoothquant, "smoothquant", {"grid": []}),
    (hqq, "hqq", {"norm": 0}), (hqq, "hqq", {"kappa": 0.5}), (hqq, "hqq", {"iters": -1}),
    (hadamard_rotation, "hadamard_rotation", {"seed": -1}), (hadamard_rotation, "hadamard_rotation", {"kind": "x"}),
    (hadamard_rotation, "hadamard_rotation", {"online": "yes"}),
    (mse_scale_search, "mse_scale_search", {"grid": 1}), (mse_scale_search, "mse_scale_search", {"norm": 0}),
    (mse_scale_search, "mse_scale_search", {"weighted": "yes"}),
    (percentile_scales, "percentile_scales", {"percentile": 100.5}),
    (quant_specs, "quant_specs", {"weight": 4}),
    (recipes.get, "recipes.get", {"name": "w8a16", "group_size": 0}),
    (lambda **kw: gptq_quantize(None, None, None, **kw), "gptq", {"block_size": 0}),
    (lambda **kw: gptaq_quantize(None, None, None, None, **kw), "gptaq", {"alpha": math.nan}),
    (lambda **kw: mixed_gptq(None, None, None, None, None, 8, **kw), "mixed_gptq", {"one_bit": "sign"}),
    (lambda **kw: allocate_bits(torch.zeros(4), 2, **kw), "allocate_bits", {"pairs": 3}),
    (lambda **kw: masked(kw["pattern"], rtn()), "masked", {"pattern": ""}),
    (lambda **kw: partition({kw["pattern"]: rtn()}), "partition", {"pattern": "re:("}),
    (lambda **kw: BlockStructure(**{**SHAPE, **kw}), "BlockStructure", {"num_kv_heads": 0}),
]


@pytest.mark.parametrize("entry", REFUSALS, ids=lambda e: f"{e[1]}-{'-'.join(e[2])}")
def test_every_transform_refuses_bad_arguments_in_one_shape(entry):
    factory, method, kwargs, *shown = entry
    name, value = list(kwargs.items())[-1]
    argument = shown[0] if shown else f"{name}={value!r}"
    message = _message(lambda: factory(**kwargs))
    assert re.fullmatch(rf"{re.escape(method)}: {re.escape(argument)} is invalid; allowed: \S.*", message), message
    assert "\n" not in message
