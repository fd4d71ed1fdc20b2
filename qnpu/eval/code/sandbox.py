"""Run untrusted generated code in a separate, limited process.

Each program runs in a fresh ``python -I`` (isolated mode: no user site, no ``PYTHON*`` variables)
started by :func:`run_program`, with

* resource limits set in the child before the program runs: ``RLIMIT_CPU`` (CPU seconds; SIGXCPU,
  then SIGKILL a second later), ``RLIMIT_AS`` (address space: an allocation beyond it raises
  MemoryError), ``RLIMIT_FSIZE`` (largest file it may write: EFBIG), ``RLIMIT_NPROC`` (processes
  of its user: fork fails with EAGAIN) and no core files;
* a private temporary directory as working directory, ``HOME`` and ``TMPDIR``, removed afterwards;
* a wall-clock timeout, after which the whole process group is killed (SIGKILL);
* stdin from /dev/null, stdout and stderr to a private file of which the last 2 KiB are kept.

Isolation (:func:`isolation`, probed once per process):

* ``namespaces`` (Linux with util-linux ``unshare``): the child runs in new network and PID
  namespaces (``unshare --net --pid --fork --kill-child``). The network namespace has only a
  loopback interface that is down, so every connection fails (ENETUNREACH) and names do not
  resolve. The child is PID 1 of its namespace: when it dies or is killed, the kernel kills every
  process left in the namespace, including any that left the process group with setsid.
  Run as root, the child also drops to uid/gid 65534 (nobody) with ``setpriv``, keeping only
  CAP_DAC_READ_SEARCH so that it can still read the interpreter (which may live under /root); it
  can write only where "nobody" can (its temporary directory, /tmp), and RLIMIT_NPROC, which the
  kernel does not apply to root, counts nobody's processes. Not root, ``unshare --user
  --map-root-user`` provides the namespaces.
* ``socket-guard`` (no usable ``unshare``): no namespaces. Socket creation is disabled in the
  child by replacing ``socket.socket`` (and ``_socket.socket``, ``create_connection``,
  ``socketpair``, ``fromfd``, ``create_server``, ``getaddrinfo``) before the program runs, which
  stops Python code but not a C extension; processes that leave the process group are found by
  their command line (which names the temporary directory) and killed.

Limits not covered: CPU and memory are per process (a program may run ``nproc`` processes of
``memory`` each); the disk outside the temporary directory is limited only by file permissions
(with ``socket-guard`` and no root, the program can write wherever the user running qnpu can);
there is no seccomp filter. Run qnpu in a container or as an unprivileged user for stronger
isolation.
"""
from __future__ import annotations

import errno
import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

RUNNER = Path(__file__).with_name("_runner.py")
NOBODY = 65534
OUTPUT_TAIL = 2048
STATUSES = ("passed", "failed", "error", "syntax_error", "timeout", "cpu_limit", "memory", "file_size",
            "process_limit", "network", "killed")


@dataclass(frozen=True)
class Limits:
    """Per-program limits: wall-clock ``timeout_s``, ``cpu_s`` CPU seconds, ``memory_mb`` MiB of
    address space, ``fsize_mb`` MiB per file written, ``nproc`` processes."""

    timeout_s: float = 10.0   # then the process group is killed
    cpu_s: int = 5            # RLIMIT_CPU (soft; the hard limit is one second more)
    memory_mb: int = 1024     # RLIMIT_AS
    fsize_mb: int = 16        # RLIMIT_FSIZE
    nproc: int = 32           # RLIMIT_NPROC

    def __post_init__(self):
        bad = {name: value for name, value in vars(self).items()
               if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0}
        if bad:
            raise ValueError("sandbox limits must be positive numbers; got " +
                             ", ".join(f"{name}={value!r}" for name, value in bad.items()))


@dataclass(frozen=True)
class SandboxResult:
    """``status`` is one of :data:`STATUSES`; ``detail`` one line saying what happened; ``output``
    the last 2 KiB of stdout and stderr; ``pgid`` the process group that was killed; ``workdir``
    the (removed) temporary directory; ``stray_killed`` processes found outside the group."""

    status: str
    detail: str
    seconds: float
    returncode: int | None
    output: str
    isolation: str
    pgid: int
    workdir: str = ""
    stray_killed: int = 0

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        return asdict(self)


def _drop_privileges() -> list[str]:
    """``setpriv`` to uid/gid nobody keeping CAP_DAC_READ_SEARCH, when running as root (else [])."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("setpriv") is None:
        return []
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
            "--inh-caps=-all,+dac_read_search", "--ambient-caps=+dac_read_search", "--"]


def _unshare_command() -> list[str] | None:
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return None
    namespaces = ["--net", "--pid", "--fork", "--kill-child"]
    if os.geteuid() == 0:
        return ["unshare", *namespaces, "--"]
    return ["unshare", "--user", "--map-root-user", *namespaces, "--"]


@functools.lru_cache(maxsize=1)
def isolation() -> str:
    """``"namespaces"`` when the namespace command works here, else ``"socket-guard"``."""
    command = _unshare_command()
    if command is None:
        return "socket-guard"
    try:
        done = subprocess.run([*command, *_drop_privileges(), sys.executable, "-I", "-c", "pass"],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "socket-guard"
    return "namespaces" if done.returncode == 0 else "socket-guard"


def _stray(marker: str) -> list[int]:
    """PIDs of live (not zombie) processes whose command line contains ``marker`` (the sandbox's
    directory)."""
    found, needle = [], marker.encode()
    proc = Path("/proc")
    for entry in proc.iterdir() if proc.is_dir() else ():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "cmdline").read_bytes() and \
                        (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX":
                    found.append(int(entry.name))
            except (OSError, IndexError):
                continue
    return found


def _kill_stray(marker: str) -> int:
    """Kill the processes :func:`_stray` finds, after giving killed ones 0.5 s to go; how many."""
    deadline = time.monotonic() + 0.5
    while _stray(marker) and time.monotonic() < deadline:
        time.sleep(0.02)
    killed = set()
    for _ in range(50):  # a fork loop may make new ones while we kill
        pids = _stray(marker)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except OSError:
                pass
        time.sleep(0.02)
    return len(killed)


PR_SET_CHILD_SUBREAPER = 36


def _subreaper(on: bool) -> bool:
    """Make this process the reaper of its orphaned descendants (Linux ``prctl``), or stop; whether
    it worked. Killed sandbox processes whose parent died first then become our zombies, which
    :func:`_reap` collects, instead of init's, which may leave them (and their count against
    RLIMIT_NPROC) for a long time in a container."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _stat(pid: int) -> tuple[str, int, int] | None:
    """``(state, ppid, pgrp)`` of a process, from /proc (None when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1]), int(fields[2])
    except (OSError, IndexError, ValueError):
        return None


def _reap(pgid: int, wait_s: float = 2.0) -> None:
    """Collect the zombies of the sandbox that were re-parented to us: our children in its process
    group, or leading their own group (a program's setsid); other children of ours are left alone."""
    me = os.getpid()
    deadline = time.monotonic() + wait_s
    while True:
        pending = False
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            info = _stat(pid)
            if info is None or info[1] != me or info[2] not in (pgid, pid):
                continue
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            pending |= done == 0
        if not pending or time.monotonic() > deadline:
            return
        time.sleep(0.02)


def _remove(folder: Path) -> None:
    def retry(func, path, _exc):  # a program may chmod its files or folders read-only
        try:
            os.chmod(os.path.dirname(path), 0o700)
            os.chmod(path, 0o700)
            func(path)
        except OSError:
            pass

    shutil.rmtree(folder, onerror=retry)


def _read_status(fd: int) -> dict | None:
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    for line in b"".join(chunks).splitlines():
        try:
            status = json.loads(line)
        except ValueError:
            continue
        if isinstance(status, dict) and status.get("status") in STATUSES:
            return status
    return None


def _signal_status(returncode: int, limits: Limits, seconds: float) -> tuple[str, str]:
    sig = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else 0
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and seconds >= limits.cpu_s):
        return "cpu_limit", f"killed: the CPU time limit ({limits.cpu_s} s) was exceeded"
    if sig == signal.SIGXFSZ:
        return "file_size", f"killed: the file size limit ({limits.fsize_mb} MiB) was exceeded"
    if sig:
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        return "killed", f"killed by {name} (memory exhausted, or a crash in native code)"
    return "error", f"the program exited with status {returncode} before its tests finished"


def run_program(source: str, limits: Limits = Limits(), *, mode: str | None = None) -> SandboxResult:
    """Run the Python program ``source`` in the sandbox and say how it ended (``passed`` only when
    it ran to its end, exit status 0, in the first process). ``mode`` forces ``"namespaces"`` or
    ``"socket-guard"`` (default: :func:`isolation`)."""
    mode = mode or isolation()
    if mode not in ("namespaces", "socket-guard"):
        raise ValueError(f"sandbox mode {mode!r} is invalid; allowed: namespaces, socket-guard")
    prefix = _unshare_command() if mode == "namespaces" else []
    if prefix is None:
        raise ValueError("sandbox mode 'namespaces' is not available here (no usable unshare)")
    prefix = prefix + _drop_privileges()
    workdir = Path(tempfile.mkdtemp(prefix="qnpu-sandbox-"))
    logdir = Path(tempfile.mkdtemp(prefix="qnpu-sandbox-log-"))
    token = secrets.token_hex(16)
    status_r, status_w = os.pipe()
    start = time.perf_counter()
    proc = None
    timed_out = False
    reaper = _subreaper(True)
    stray = 0
    try:
        program = workdir / "program.py"
        program.write_text(source, encoding="utf-8")
        if _drop_privileges():
            os.chown(workdir, NOBODY, NOBODY)
            os.chown(program, NOBODY, NOBODY)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(workdir), "TMPDIR": str(workdir),
               "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        args = [*prefix, sys.executable, "-I", str(RUNNER), str(program), str(status_w), str(int(limits.cpu_s)),
                str(int(limits.memory_mb) << 20), str(int(limits.fsize_mb) << 20), str(int(limits.nproc)),
                "1" if mode == "socket-guard" else "0"]
        with open(logdir / "output.txt", "w+b") as log:
            proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
                                    env=env, pass_fds=(status_w,), start_new_session=True)
            os.close(status_w)
            status_w = -1
            try:
                proc.stdin.write((token + "\n").encode())
                proc.stdin.close()
            except OSError:  # it died before reading its token
                pass
            try:
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            seconds = time.perf_counter() - start
            _killpg(proc.pid)
            proc.wait()
            stray = _kill_stray(str(workdir))
            if reaper:
                _reap(proc.pid)
            status = _read_status(status_r)
            log.seek(max(0, log.seek(0, os.SEEK_END) - OUTPUT_TAIL))
            output = log.read().decode("utf-8", "replace")
    finally:
        if proc is not None and proc.poll() is None:
            _killpg(proc.pid)
            proc.wait()
        for fd in (status_r, status_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        if reaper:
            _subreaper(False)
        _remove(workdir)
        _remove(logdir)
    if timed_out:
        kind, detail = "timeout", f"killed after the wall-clock timeout of {limits.timeout_s:g} s"
    elif status is not None and status["status"] == "passed":
        ok = status.get("token") == token and proc.returncode == 0
        kind, detail = ("passed", "all tests passed") if ok else \
            ("error", "the program's status could not be trusted (wrong token or exit status)")
    elif status is not None:
        kind, detail = status["status"], str(status.get("detail", ""))[:400]
    else:
        kind, detail = _signal_status(proc.returncode, limits, seconds)
    return SandboxResult(status=kind, detail=detail, seconds=round(seconds, 3), returncode=proc.returncode,
                         output=output, isolation=mode, pgid=proc.pid, workdir=str(workdir),
                         stray_killed=stray)


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError as err:
        if err.errno not in (errno.ESRCH, errno.EPERM):
            raise
