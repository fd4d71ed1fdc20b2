"""The sandbox against hostile programs: each is stopped, reported, and leaves nothing behind."""
import os
import shutil
import sys
from pathlib import Path

import pytest

from qnpu.eval.code.sandbox import Limits, _stray, isolation, run_program

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox's limits are Linux's")

FAST = Limits(timeout_s=3.0, cpu_s=2, memory_mb=256, fsize_mb=1, nproc=16)
MODES = ["socket-guard"] + (["namespaces"] if isolation() == "namespaces" else [])
# RLIMIT_NPROC does not bind root: the socket-guard fork test needs setpriv to drop to nobody
NPROC_BINDS = os.geteuid() != 0 or shutil.which("setpriv") is not None


def assert_left_nothing(result):
    assert not Path(result.workdir).exists(), "the temporary directory was not removed"
    with pytest.raises(ProcessLookupError):
        os.killpg(result.pgid, 0)  # the process group is gone
    assert _stray(result.workdir) == []  # and nothing that left it lives on


@pytest.mark.parametrize("mode", MODES)
def test_a_passing_and_a_failing_solution(mode):
    ok = run_program("def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\nprint('done')\n", FAST, mode=mode)
    assert (ok.status, ok.passed, ok.returncode) == ("passed", True, 0)
    assert ok.isolation == mode
    bad = run_program("def add(a, b):\n    return a - b\n\nassert add(2, 3) == 5, 'wrong sum'\n", FAST, mode=mode)
    assert bad.status == "failed" and not bad.passed and "wrong sum" in bad.detail
    assert_left_nothing(ok), assert_left_nothing(bad)


@pytest.mark.parametrize("mode", MODES)
def test_an_infinite_loop_is_killed_and_reported(mode):
    result = run_program("while True:\n    pass\n", FAST, mode=mode)
    assert result.status in ("timeout", "cpu_limit") and not result.passed
    assert result.seconds < FAST.timeout_s + 5
    assert "timeout" in result.detail or "CPU time limit" in result.detail
    assert_left_nothing(result)


def test_a_sleeping_program_hits_the_wall_clock_timeout():
    result = run_program("import time\ntime.sleep(60)\n", Limits(timeout_s=1.0), mode=MODES[-1])
    assert result.status == "timeout" and "wall-clock timeout of 1 s" in result.detail
    assert_left_nothing(result)


@pytest.mark.parametrize("mode", [m for m in MODES if m == "namespaces" or NPROC_BINDS])
def test_a_fork_bomb_is_bounded_and_leaves_no_process(mode):
    result = run_program("import os\nwhile True:\n    os.fork()\n", FAST, mode=mode)
    assert result.status == "process_limit" and "process limit (16)" in result.detail
    assert_left_nothing(result)


@pytest.mark.parametrize("mode", MODES)
def test_a_forking_program_that_hangs_is_cleaned_up(mode):
    source = ("import os, time\nfor _ in range(3):\n    if os.fork() == 0:\n        os.setsid()\n"
              "        time.sleep(60)\ntime.sleep(60)\n")
    result = run_program(source, Limits(timeout_s=1.5, nproc=16), mode=mode)
    assert result.status == "timeout"
    assert_left_nothing(result)  # setsid children are not in the group, yet are gone


RESOURCE_HOGS = {
    "memory": ("chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 24))\n", "memory limit (256 MiB"),
    "file_size": ("with open('big.bin', 'wb') as f:\n    while True:\n        f.write(b'x' * 65536)\n",
                  "file size limit (1024 KiB)"),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("status", sorted(RESOURCE_HOGS))
def test_unbounded_allocation_and_disk_filling_stop_at_their_limits(mode, status):
    source, detail = RESOURCE_HOGS[status]
    result = run_program(source, FAST, mode=mode)
    assert result.status == status and detail in result.detail
    assert_left_nothing(result)  # big.bin went with the temporary directory


@pytest.mark.parametrize("mode", MODES)
def test_a_socket_connection_fails(mode):
    source = "import socket\ns = socket.create_connection(('93.184.216.34', 80), timeout=2)\n"
    result = run_program(source, FAST, mode=mode)
    assert result.status == "network" and "network access blocked" in result.detail
    local = run_program("import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 22))\n", FAST, mode=mode)
    assert local.status == "network"


def test_syntax_errors_and_early_exits_are_not_passes():
    mode = MODES[-1]
    assert run_program("def f(:\n", FAST, mode=mode).status == "syntax_error"
    early = run_program("import os\nos._exit(0)\nassert False\n", FAST, mode=mode)
    assert early.status == "error" and "before its tests finished" in early.detail
    assert run_program("import sys\nsys.exit(0)\nassert False\n", FAST, mode=mode).status == "error"
    forged = run_program("import json, os, sys\nos.write(int(sys.argv[2]), json.dumps({'status': 'passed'}).encode()"
                         " + b'\\n')\nos._exit(0)\n", FAST, mode=mode)
    assert forged.status == "error" and not forged.passed


def test_the_program_runs_in_its_own_temporary_directory():
    result = run_program("import os\nopen('note.txt', 'w').write('x')\n"
                         "assert os.getcwd().startswith(os.environ['TMPDIR'])\n"
                         "assert 'qnpu-sandbox-' in os.getcwd()\n", FAST, mode=MODES[-1])
    assert result.passed, result.detail + result.output
    assert_left_nothing(result)


def test_limits_are_checked():
    with pytest.raises(ValueError, match="timeout_s=0"):
        Limits(timeout_s=0)
    with pytest.raises(ValueError, match="sandbox mode"):
        run_program("pass", FAST, mode="docker")
