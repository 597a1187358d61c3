"""A zygote worker: forked by the server for one connection, it takes the requesting CLI
process's command line, environment, working directory, umask and stdio, and runs the
command as `hanabi_runtime.lean` would in that process, its imports already done. The
stand-ins it starts are started (and reaped) by the CLI process (`ClientSpawner`).
"""

from __future__ import annotations

import io
import logging
import os
import signal
import socket
import struct
import sys
import traceback
from dataclasses import dataclass
from collections.abc import Mapping, Sequence
from typing import NoReturn

from hanabi_common.errors import Internal
from hanabi_runtime import spawner
from hanabi_runtime.zygote import protocol as P

log = logging.getLogger("hanabi.zygote")
REQUEST_TIMEOUT_S = 10.0  # for the first message, from a client that connected


@dataclass(frozen=True)
class Origin:
    """What the server loaded before it forked: module names, and the mtimes of hanabi's
    own source files (a worker refuses once they changed: the code it holds is stale)."""

    modules: frozenset[str]
    sources: Mapping[str, int]

    def stale(self) -> str | None:
        """The first source file changed since the server loaded it, or None."""
        for path, mtime in self.sources.items():
            try:
                if os.stat(path).st_mtime_ns != mtime:
                    return path
            except OSError:
                return path
        return None


class ClientSpawner:
    """Stand-ins started and reaped by the CLI process at the other end of `conn`, whose
    child they must be (`hanabi_runtime.spawner`)."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn

    def spawn(self, argv: list[str], fds: Mapping[int, int], setsid: bool) -> int:
        targets = list(fds)
        P.send(self.conn, P.SPAWN, [fds[t] for t in targets], argv=argv, targets=targets, setsid=setsid)
        reply = self._reply(P.SPAWNED)
        if reply["op"] == P.FAILED:
            raise OSError(f"the CLI process could not start {argv[2:3]}: {reply.get('error')}")
        return P.field(reply, "pid", int)

    def wait(self, pid: int, forward_signals: bool = False) -> int:
        P.send(self.conn, P.WAIT, pid=pid, forward_signals=forward_signals)
        return P.field(self._reply(P.WAITED), "status", int)

    def _reply(self, expected: str) -> dict:
        try:
            message, fds = P.recv(self.conn)
        except (OSError, P.ProtocolError) as exc:
            raise Internal(f"the CLI process that asked for this command is gone ({exc})") from None
        P.close_fds(fds)
        if message["op"] not in (expected, P.FAILED):
            raise Internal(f"the CLI process answered {message['op']} to a request for {expected}")
        return message


def run(conn: socket.socket, origin: Origin, inherited: Sequence[int]) -> NoReturn:
    """The forked child's whole life: serve `conn`, then end without the interpreter's teardown."""
    try:
        for fd in inherited:
            os.close(fd)
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        _serve(conn, origin)
    except BaseException:  # its own failure, not the command's: for the server's log
        log.exception("zygote worker failed")
    finally:
        os._exit(0)


def _serve(conn: socket.socket, origin: Origin) -> None:
    conn.settimeout(REQUEST_TIMEOUT_S)
    try:
        message, fds = P.recv(conn)
    except (OSError, P.ProtocolError) as exc:
        _refuse(conn, str(exc))
        return
    conn.settimeout(None)
    if message["op"] == P.PING:
        P.close_fds(fds)
        P.send(conn, P.PONG, pid=os.getppid())
        return
    try:
        request = _check(conn, message, fds, origin)
    except P.ProtocolError as exc:
        P.close_fds(fds)
        _refuse(conn, str(exc))
        return
    try:
        os.chdir(request["cwd"])
        _take_rlimits(request["rlimits"])
    except (OSError, ValueError) as exc:
        P.close_fds(fds)
        _refuse(conn, f"cannot take the client's working directory or resource limits: {exc}")
        return
    log.info("running a command", extra={"argv": request["argv"][1:][:12], "client": request["client_pid"]})
    _become(request, fds)
    spawner.use(ClientSpawner(conn))
    P.send(conn, P.STARTED, pid=os.getpid())
    status = _run_command(request["argv"])
    P.send(conn, P.EXIT, status=status, imported=sorted(set(sys.modules) - origin.modules))


def _refuse(conn: socket.socket, reason: str) -> None:
    """Say in the server's log, and to the client (which then runs the command itself), why
    this request is not served."""
    log.warning("refused a request", extra={"reason": reason})
    try:
        P.send(conn, P.REFUSE, reason=reason[:1000])
    except OSError:
        pass


def _check(conn: socket.socket, message: dict, fds: list[int], origin: Origin) -> dict:
    """The run request's fields, checked; ProtocolError says why it is refused."""
    if message["op"] != P.RUN:
        raise P.ProtocolError(f"expected a {P.RUN} request, not {message['op']}")
    pid, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    if uid != os.geteuid():
        raise P.ProtocolError(f"uid {uid} may not use this zygote (it serves uid {os.geteuid()})")
    argv = P.field(message, "argv", list)
    env = P.field(message, "env", dict)
    stdio = P.field(message, "stdio", list)
    P.field(message, "cwd", str)
    P.field(message, "umask", int)
    P.field(message, "rlimits", dict)
    if not argv or not all(isinstance(a, str) for a in argv):
        raise P.ProtocolError("argv must be a non-empty list of strings")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise P.ProtocolError("env must map strings to strings")
    if len(stdio) != len(fds) or len(set(stdio)) != len(stdio) or not set(stdio) <= {0, 1, 2}:
        raise P.ProtocolError("stdio must name the fds sent, among 0, 1 and 2")
    if P.field(message, "namespaces", dict) != P.namespaces():
        raise P.ProtocolError("the client is in another mount or pid namespace")
    changed = origin.stale()
    if changed is not None:
        raise P.ProtocolError(f"{changed} changed since the zygote started: restart hanabi-zygote")
    return {**message, "client_pid": pid}


def _take_rlimits(limits: dict) -> None:
    """The client's resource limits, each one it sent (names this Python does not know are
    refused: the limits would differ)."""
    import resource

    for name, value in limits.items():
        if not (name.startswith("RLIMIT_") and hasattr(resource, name)):
            raise ValueError(f"unknown resource limit {name!r}")
        if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value)):
            raise ValueError(f"resource limit {name} must be [soft, hard]")
        resource.setrlimit(getattr(resource, name), (value[0], value[1]))


def _become(request: dict, fds: list[int]) -> None:
    """Take the client's stdio, umask and environment (its cwd is taken already)."""
    logging.getLogger().handlers.clear()  # the server's; the command sets up its own
    logging.getLogger().setLevel(logging.WARNING)
    given = dict(zip(request["stdio"], fds, strict=True))
    for target in (0, 1, 2):
        if target in given:
            os.dup2(given[target], target)
        else:
            try:
                os.close(target)
            except OSError:
                pass
    P.close_fds(fds)
    sys.stdin = _stream(0, "r")
    sys.stdout = _stream(1, "w")
    sys.stderr = _stream(2, "w", errors="backslashreplace", line_buffering=True)
    os.umask(request["umask"])
    os.environ.clear()
    os.environ.update(request["env"])


def _stream(fd: int, mode: str, errors: str = "strict", line_buffering: bool = False) -> io.TextIOWrapper | None:
    """A standard stream over `fd`, buffered as the interpreter would buffer it (None when
    `fd` is closed, as the interpreter leaves it)."""
    try:
        binary = open(fd, mode + "b", closefd=False)
    except OSError:
        return None
    return io.TextIOWrapper(binary, encoding="utf-8", errors=errors,
                            line_buffering=line_buffering or os.isatty(fd))


def _run_command(argv: list[str]) -> int:
    """`hanabi_runtime.lean.main` without the zygote and without ending the process: the status."""
    from hanabi_runtime import lean

    sys.argv = list(argv)
    code: object = None
    try:
        lean.dispatch(zygote=False)
    except SystemExit as exc:
        code = exc.code
    except BaseException:
        traceback.print_exc()
        code = 1
    return lean.finish(code)


