"""A malformed recipe file is refused in one line that starts "recipe file <path>:" and says where
(JSON: line and column; YAML: its multi-line message squashed to one line); an unknown transform,
even nested in a chain, is named with close registered names; a seed that is not an int >= 0 is
refused when the file is read, so `qnpu quantize` exits 2 before any model is loaded."""
from __future__ import annotations

import json

import pytest

import qnpu.jobs
from qnpu.cli import main
from qnpu.transforms import recipe_to_dict, recipes

yaml = pytest.importorskip("yaml")


def _write(tmp_path, data, suffix=".json", name="recipe"):
    path = tmp_path / f"{name}{suffix}"
    if isinstance(data, (str, bytes)):
        path.write_bytes(data.encode() if isinstance(data, str) else data)
    else:
        path.write_text(json.dumps(data) if suffix == ".json" else yaml.safe_dump(data))
    return path


def _refused(path, *, match: str) -> str:
    with pytest.raises(ValueError, match=match) as info:
        recipes.load(path)
    message = str(info.value)
    assert message.startswith(f"recipe file {path}: ") and "\n" not in message, message
    return message


@pytest.fixture
def loads(monkeypatch) -> list:
    calls: list = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("loaded")

    monkeypatch.setattr(qnpu.jobs, "load", refuse)
    return calls


def _cli_refuses(path, tmp_path, capsys, loads) -> str:
    assert main(["quantize", "--recipe", str(path), "--model", str(tmp_path / "model"), "--no-eval",
                 "--output", str(tmp_path / "out")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"qnpu quantize: error: recipe file {path}: "), err
    assert loads == []
    return err[0]


# -- malformed files -------------------------------------------------------------------------------
def test_malformed_json_names_the_file_line_and_column(tmp_path, capsys, loads):
    path = _write(tmp_path, '{"transform": "chain",\n "transforms": [}\n')
    message = _refused(path, match="not valid JSON")
    assert "line 2 column 17" in message
    assert "line 2 column 17" in _cli_refuses(path, tmp_path, capsys, loads)


@pytest.mark.parametrize("text", ["transform: chain\n  transforms: [", "transform: chain\ntransforms: [\n  - a: 1\n b"])
def test_malformed_yaml_is_one_line_naming_the_file_and_line(tmp_path, capsys, loads, text):
    path = _write(tmp_path, text, ".yaml")
    message = _refused(path, match="not valid YAML")
    assert "line " in message and "column " in message
    _cli_refuses(path, tmp_path, capsys, loads)


def test_a_file_that_is_not_text_names_the_file(tmp_path, capsys, loads):
    path = _write(tmp_path, b'{"transform": "\xff\xfe"}')
    _refused(path, match="UTF-8")
    _cli_refuses(path, tmp_path, capsys, loads)


@pytest.mark.parametrize("data", [[1, 2], "just a string", None, {"transforms": []}])
def test_a_file_without_a_transform_mapping_says_what_it_needs(tmp_path, data):
    path = _write(tmp_path, json.dumps(data))
    _refused(path, match="'transform'")


# -- unknown transforms ----------------------------------------------------------------------------
def _recipe(name: str = "w4a16-gptq") -> dict:
    return recipe_to_dict(recipes.get(name))


def test_an_unknown_transform_nested_in_a_chain_is_named_with_close_names(tmp_path, capsys, loads):
    data = _recipe()
    data["transforms"][1]["transform"] = "gtpq"
    path = _write(tmp_path, data)
    message = _refused(path, match=r"unknown transform 'gtpq', did you mean gptq")
    assert "argument" not in message and "is dict" not in message
    assert "unknown transform 'gtpq'" in _cli_refuses(path, tmp_path, capsys, loads)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_unknown_transforms_anywhere_are_named(tmp_path, suffix):
    top = {**_recipe(), "transform": "chian"}
    _refused(_write(tmp_path, top, suffix, "top"), match=r"unknown transform 'chian', did you mean chain")
    data = recipe_to_dict(recipes.get("w8a8"))  # chain(quant_specs, masked(pattern, quant_specs), ...)
    data["transforms"][1]["inner"]["transform"] = "quant_spec"
    _refused(_write(tmp_path, data, suffix, "masked"), match=r"unknown transform 'quant_spec', did you mean quant_specs")


def test_a_name_close_to_nothing_lists_the_registered_transforms(tmp_path):
    data = _recipe()
    data["transforms"][1]["transform"] = "zzzzzz"
    message = _refused(_write(tmp_path, data), match=r"unknown transform 'zzzzzz'")
    assert "gptq" in message and "chain" in message


# -- seeds -----------------------------------------------------------------------------------------
def _with_seed(seed, transform: str = "rtn") -> dict:
    data = _recipe("w4a16-rtn" if transform == "rtn" else "w4a8-hadamard")
    entry = next(t for t in data["transforms"] if t["transform"] == transform)
    entry["seed"] = seed
    return data


@pytest.mark.parametrize("seed", ["1", 1.0, 1.5, True, None, -1])
@pytest.mark.parametrize("transform", ["rtn", "hadamard_rotation"])
def test_a_seed_that_is_not_a_non_negative_int_is_refused(tmp_path, seed, transform):
    message = _refused(_write(tmp_path, _with_seed(seed, transform)), match="seed")
    assert f"seed={seed!r}" in message and transform in message


def test_a_yaml_string_seed_fails_before_loading_the_model(tmp_path, capsys, loads):
    path = _write(tmp_path, _with_seed("1"), ".yaml")
    assert "seed='1'" in _cli_refuses(path, tmp_path, capsys, loads)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_int_seeds_still_load(tmp_path, suffix):
    for transform in ("rtn", "hadamard_rotation"):
        data = _with_seed(7, transform)
        assert recipe_to_dict(recipes.load(_write(tmp_path, data, suffix))) == data
