"""Recipe values are what they say: a boolean written as a string ("false") is refused, naming the
parameter and the file, instead of being read as true; and quantizing finite values near the
float32 limit gives finite results (or a clear refusal), never NaN/Inf."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qnpu.cli import main
from qnpu.qcore import QSpec, choose_qparams, dequantize, quantize
from qnpu.testing import assert_codes_in_range, assert_error_within_step, quantization_cases
from qnpu.transforms import recipe_to_dict, recipes

F32_MAX = torch.finfo(torch.float32).max
LIMIT = "beyond the float32 limit"  # the refusal's wording


def _recipe_file(tmp_path, field: str, value, suffix: str = ".json"):
    data = recipe_to_dict(recipes.get("w3a16-gptq"))
    data["transforms"][0]["weight"]["__qspec__"][field] = value
    path = tmp_path / f"recipe{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(data))
    else:
        import yaml

        path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("field", ["symmetric", "dynamic", "full_range"])
@pytest.mark.parametrize("value", ["false", "true", 0, 1, None])
def test_qspec_booleans_must_be_booleans(field, value):
    with pytest.raises(ValueError, match=rf"{field}={value!r} is invalid; allowed: True \| False"):
        QSpec(bits=4, **{field: value})


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_string_boolean_in_a_recipe_file_names_the_parameter_and_the_file(tmp_path, suffix):
    path = _recipe_file(tmp_path, "symmetric", "false", suffix)
    with pytest.raises(ValueError, match=r"symmetric='false' is invalid") as info:
        recipes.load(path)
    assert str(path) in str(info.value)


def test_the_cli_refuses_it_with_exit_2_before_loading_a_model(tmp_path, capsys):
    path = _recipe_file(tmp_path, "symmetric", "false")
    assert main(["quantize", "--recipe", str(path), "--model", str(tmp_path / "no-model"), "--no-eval",
                 "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(path) in err and "symmetric='false'" in err


def test_real_booleans_still_load(tmp_path):
    for suffix in (".json", ".yaml"):
        loaded = recipes.load(_recipe_file(tmp_path, "symmetric", False, suffix))
        assert recipe_to_dict(loaded) == recipe_to_dict(recipes.get("w3a16-gptq"))


# -- values near the float32 limit ------------------------------------------------------------------
SPECS = [QSpec(bits=b, format=f, symmetric=s, full_range=r)
         for b in (2, 3, 4, 8) for f, s, r in (("uint", False, False), ("int", False, False),
                                               ("int", True, False), ("int", True, True), ("uint", True, False))]


def _check(x: torch.Tensor, spec: QSpec) -> bool:
    """Quantize ``x``: True when it succeeded with finite, in-range, within-half-a-step results;
    False when refused with the clear message; anything else fails the test."""
    try:
        q = quantize(x, spec)
    except ValueError as err:
        assert LIMIT in str(err) and "QTensor" not in str(err), str(err)
        return False
    assert bool(torch.isfinite(q.scale).all()), q.scale
    assert bool(torch.isfinite(dequantize(q)).all()), dequantize(q)
    assert_codes_in_range(q)
    if spec.clip_ratio == 1.0:
        assert_error_within_step(x, q)
    return True


@pytest.mark.parametrize("magnitude", [1e38, 3e38, 3.4e38, F32_MAX])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.bits}b-{s.format}-{'sym' if s.symmetric else 'asym'}"
                         f"{'-full' if s.full_range else ''}")
def test_huge_finite_values_stay_finite_or_are_refused_clearly(spec, magnitude):
    x = torch.tensor([[-magnitude, 0.3 * magnitude, magnitude, 0.0], [1.0, -2.0, 0.5, magnitude]])
    _check(x, spec)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("fmt", ["int", "uint"])
def test_asymmetric_weights_of_magnitude_3e38_quantize_to_finite_values(bits, fmt):
    x = torch.tensor([[-3e38, 1e38, 3e38, 0.0], [-3e38, -1.0, 2e38, 3e38]])
    spec = QSpec(bits=bits, format=fmt, symmetric=False)
    scale, _ = choose_qparams(x, spec)
    assert bool(torch.isfinite(scale).all())
    assert _check(x, spec)  # accepted, not refused


@given(quantization_cases(), st.floats(1e37, F32_MAX))
def test_any_spec_near_the_float32_limit_is_finite_or_refused(case, magnitude):
    x, spec = case
    amax = x.abs().max()
    if float(amax) == 0.0:
        return
    _check((x.double() / float(amax) * magnitude).float(), spec)
