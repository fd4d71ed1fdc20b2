"""The sandbox's child side: run as ``python -I _runner.py PROGRAM STATUS_FD CPU_S AS_BYTES FSIZE_BYTES
NPROC GUARD`` (standard library only; never imported by qnpu).

It reads a one-time token from stdin, then, as PID 1 of a new PID namespace, forks once and waits
(PID 1 ignores signals it has no handler for, and reaps orphans); the worker sets the resource
limits, blocks socket creation when GUARD is 1, executes PROGRAM as ``__main__`` and writes one JSON
status line to STATUS_FD: ``{"status", "detail", "token"}``, the token only when the program ran to
its end. Only the first process writes it; processes the program forked exit silently.
"""
import errno
import json
import os
import resource
import sys


def _guard_network():
    import socket

    import _socket

    class NetworkDisabled(PermissionError):
        pass

    def deny(*args, **kwargs):
        raise NetworkDisabled(errno.EACCES, "network access is disabled in the qnpu sandbox")

    class Socket(socket.socket):
        def __init__(self, *args, **kwargs):
            deny()

    for module in (socket, _socket):
        module.socket = Socket
    for name in ("create_connection", "socketpair", "fromfd", "create_server", "getaddrinfo"):
        setattr(socket, name, deny)
    return NetworkDisabled


def _classify(err, limits, network_error):
    kind = type(err).__name__
    text = f"{kind}: {err}"[:300]
    if isinstance(err, MemoryError):
        return "memory", f"MemoryError: the memory limit ({limits['as'] >> 20} MiB address space) was reached"
    if network_error is not None and isinstance(err, network_error):
        return "network", f"network access blocked: {text}"
    if isinstance(err, OSError):
        code = err.errno
        if code == errno.EFBIG:
            return "file_size", f"the file size limit ({limits['fsize'] >> 10} KiB) was reached: {text}"
        if code == errno.EAGAIN and isinstance(err, BlockingIOError):
            return "process_limit", f"the process limit ({limits['nproc']}) was reached: {text}"
        if code in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EADDRNOTAVAIL):
            return "network", f"network access blocked: {text}"
        if kind == "gaierror":
            return "network", f"network access blocked (no name resolution): {text}"
    if isinstance(err, AssertionError):
        return "failed", f"a test failed: {text}" if str(err) else "a test failed (AssertionError)"
    if isinstance(err, SystemExit):
        return "error", f"the program exited before its tests finished (SystemExit {err.code!r})"
    return "error", text


def main():
    program, status_fd = sys.argv[1], int(sys.argv[2])
    cpu, address_space, fsize, nproc, guard = (int(a) for a in sys.argv[3:8])
    token = sys.stdin.readline().strip()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    if os.getpid() == 1:  # init of a new PID namespace: a worker does the work
        worker = os.fork()
        if worker:
            while True:
                try:
                    pid, wait_status = os.wait()
                except ChildProcessError:
                    os._exit(1)
                if pid == worker:
                    code = os.waitstatus_to_exitcode(wait_status)
                    os._exit(code if code >= 0 else 128 - code)
    limits = {"as": address_space, "fsize": fsize, "nproc": nproc}
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    network_error = _guard_network() if guard else None
    with open(program, encoding="utf-8") as f:
        source = f.read()
    main_pid = os.getpid()
    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    status = {"status": "passed", "detail": "all tests passed"}
    try:
        code = compile(source, "program.py", "exec")
    except (SyntaxError, ValueError) as err:
        status = {"status": "syntax_error", "detail": f"{type(err).__name__}: {err}"[:300]}
    else:
        try:
            exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
            status["token"] = token
        except BaseException as err:  # noqa: BLE001 - every way a program can fail is a result
            if os.getpid() != main_pid:
                os._exit(1)
            kind, detail = _classify(err, limits, network_error)
            status = {"status": kind, "detail": detail}
    if os.getpid() != main_pid:  # a forked child that ran to the end
        os._exit(0)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 - a full disk must not lose the status
            pass
    try:
        os.write(status_fd, (json.dumps(status) + "\n").encode())
    except OSError:
        pass
    os._exit(0 if "token" in status else 1)


if __name__ == "__main__":
    main()
