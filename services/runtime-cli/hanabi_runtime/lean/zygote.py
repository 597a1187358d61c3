"""The CLI's side of the zygote (`hanabi_runtime.zygote`): hand a command to a worker that
has its imports done, and do for it what must be this process's own (spawn and reap the
stand-ins, forward signals, exit with the command's status).

`run_in_zygote` answers None when there is no zygote or it refuses before doing anything:
the caller then runs the command itself, with the same result, only slower.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Callable

from hanabi_runtime.spawner import FORWARDED_SIGNALS, forward_signals, spawn_here, wait_here
from hanabi_runtime.zygote import protocol as P

PROGRAM = "hanabi-runtime"
WORKER_EXIT_TIMEOUT_S = 10.0  # after its exit message; it only ends itself then


def run_in_zygote(run_dir: str, argv: list[str], on_exit: Callable[[dict], None] | None = None) -> int | None:
    """Run `argv` (sys.argv: the program name, then the command line) in a zygote worker:
    its exit status, or None when the caller must run it itself. `on_exit` sees the
    worker's exit message."""
    try:
        cwd = os.getcwd()
    except OSError:
        return None  # a deleted working directory cannot be handed over by path
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        try:
            sock.connect(P.socket_path(run_dir))
        except OSError:
            return None  # no zygote (or not ours to use)
        return _converse(sock, argv, cwd, on_exit)
    finally:
        sock.close()


def _open_stdio() -> list[int]:
    return [fd for fd in (0, 1, 2) if _is_open(fd)]


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _converse(sock: socket.socket, argv: list[str], cwd: str, on_exit) -> int | None:
    umask = os.umask(0)
    os.umask(umask)
    stdio = _open_stdio()
    try:
        P.send(sock, P.RUN, stdio, argv=argv, cwd=cwd, env=dict(os.environ), umask=umask,
               rlimits=P.rlimits(), namespaces=P.namespaces(), stdio=stdio)
        message, fds = P.recv(sock)
    except (OSError, P.ProtocolError):
        return None  # it went away before doing anything
    P.close_fds(fds)
    worker = message.get("pid")
    if message["op"] != P.STARTED or not isinstance(worker, int) or worker <= 0:
        return None  # refused (another namespace, its code changed since it started...)
    try:
        worker_fd = os.pidfd_open(worker)
    except OSError:
        return None  # gone already: it did nothing for us
    forwarded: list[int] = []
    forward_signals(worker, forwarded)  # the CLI's signals are the worker's, as they were ours
    while True:
        try:
            message, fds = P.recv(sock)
            op = message["op"]
            if op == P.SPAWN:
                _spawn(sock, message, fds)
                continue
            P.close_fds(fds)
            if op == P.EXIT:
                status = P.field(message, "status", int)
                _wait_gone(worker_fd)
                if on_exit is not None:
                    on_exit(message)
                return status
            if op != P.WAIT:
                raise P.ProtocolError(f"an unexpected {op} message")
            pid = P.field(message, "pid", int)
            forward = bool(message.get("forward_signals"))
            if not forward:  # as a CLI waiting without forwarding: a signal ends this process
                for signum in FORWARDED_SIGNALS:
                    signal.signal(signum, signal.SIG_DFL)
            status = wait_here(pid, forward)
            forward_signals(worker, forwarded)  # the CLI's signals are the worker's, as they were ours
            P.send(sock, P.WAITED, status=status)
        except (OSError, P.ProtocolError) as exc:
            return _worker_lost(exc, forwarded)


def _wait_gone(pidfd: int) -> None:
    """Until the worker has exited (for at most WORKER_EXIT_TIMEOUT_S): what it held (a
    thread in a network namespace, an open file) is released by then, as it would be by
    the end of this process's own run."""
    import select

    try:
        select.select([pidfd], [], [], WORKER_EXIT_TIMEOUT_S)
    finally:
        os.close(pidfd)


def _spawn(sock: socket.socket, message: dict, fds: list[int]) -> None:
    try:
        argv = P.field(message, "argv", list)
        targets = P.field(message, "targets", list)
        if not argv or not all(isinstance(a, str) for a in argv):
            raise P.ProtocolError("spawn: argv must be a non-empty list of strings")
        if len(targets) != len(fds) or not all(isinstance(t, int) and t > 2 for t in targets):
            raise P.ProtocolError("spawn: the targets do not match the fds")
        pid = spawn_here(argv, dict(zip(targets, fds, strict=True)), setsid=bool(message.get("setsid")))
    except (OSError, P.ProtocolError) as exc:
        P.send(sock, P.FAILED, error=str(exc))
    else:
        P.send(sock, P.SPAWNED, pid=pid)
    finally:
        P.close_fds(fds)


def _worker_lost(exc: Exception, forwarded: list[int]) -> int:
    """The worker ended without an exit status: killed by a signal we passed on (then this
    process ends the same way, as it would have without a zygote), or lost."""
    if forwarded:  # each of FORWARDED_SIGNALS ends a process by default
        signum = forwarded[-1]
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    sys.stderr.write(f"{PROGRAM}: internal: the zygote worker ended without an exit status ({exc})\n")
    return 1


