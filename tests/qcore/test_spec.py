import dataclasses
import json

import pytest
from hypothesis import given

from qnpu.qcore import QSpec
from qnpu.testing import qspecs


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"bits": 0}, "bits"),
        ({"bits": 9}, "bits"),
        ({"bits": 4.0}, "bits"),
        ({"bits": True}, "bits"),
        ({"format": "float"}, "format"),
        ({"granularity": "block"}, "granularity"),
        ({"granularity": "group"}, "group_size"),
        ({"granularity": "group", "group_size": 0}, "group_size"),
        ({"granularity": "group", "group_size": -32}, "group_size"),
        ({"group_size": 64}, "group_size"),
        ({"granularity": "token"}, "dynamic"),
        ({"clip_ratio": 0.0}, "clip_ratio"),
        ({"clip_ratio": 1.5}, "clip_ratio"),
        ({"format": "binary", "bits": 2}, "bits"),
        ({"format": "binary", "bits": 1, "symmetric": False}, "symmetric"),
        ({"bits": 1}, "bits"),
        ({"bits": 1, "format": "uint"}, "bits"),
        ({"full_range": True, "symmetric": False}, "full_range"),
        ({"axis": "0"}, "axis"),
    ],
)
def test_invalid_specs_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name) as err:
        QSpec(**kwargs)
    assert "allowed" in str(err.value)


def test_spec_is_frozen_and_keyword_only():
    spec = QSpec(bits=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.bits = 8
    with pytest.raises(TypeError):
        QSpec(4)  # positional arguments are refused


def test_replace_revalidates():
    with pytest.raises(ValueError, match="group_size"):
        QSpec(bits=4).replace(granularity="group")
    assert QSpec(bits=4).replace(bits=8) == QSpec(bits=8)


@pytest.mark.parametrize(
    "spec, qmin, qmax",
    [
        (QSpec(bits=8), -128, 127),
        (QSpec(bits=4), -8, 7),
        (QSpec(bits=2), -2, 1),
        (QSpec(bits=8, format="uint", symmetric=False), 0, 255),
        (QSpec(bits=1, format="uint", symmetric=False), 0, 1),
        (QSpec(bits=1, format="binary"), -1, 1),
    ],
)
def test_integer_ranges(spec, qmin, qmax):
    assert (spec.qmin, spec.qmax) == (qmin, qmax)


def test_symmetric_levels_match_ascend_int8_and_full_range():
    assert QSpec(bits=8).symmetric_levels == 127  # npu_dynamic_quant: scale = amax / 127
    assert QSpec(bits=4, full_range=True).symmetric_levels == 7.5
    assert QSpec(bits=4, format="uint").symmetric_zero == 8


@given(qspecs(formats=("int", "uint", "binary")))
def test_dict_round_trip_is_exact(spec):
    assert QSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown keys"):
        QSpec.from_dict({"bits": 4, "bitz": 8})
