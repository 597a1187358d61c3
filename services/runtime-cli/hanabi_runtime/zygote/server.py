"""The zygote server: import what `create`, `run` and `exec` use, bind `<run_dir>/zygote.sock`
and fork a worker (`worker.run`) for each connection.

Single-threaded on purpose (a fork copies only the calling thread): the main loop waits in
select for a connection, a signal (SIGTERM/SIGINT stop it) or the watchdog's tick. It never
reads from a client itself, so a silent or hostile client holds up only its own worker.
Workers are not waited for (SIGCHLD is ignored: the kernel reaps them); with systemd's
KillMode=process a restart of the server leaves the commands in flight running.
"""

from __future__ import annotations

import importlib
import logging
import os
import select
import signal
import socket
import sys
from pathlib import Path

from hanabi_common.config import Config
from hanabi_common.errors import FailedPrecondition
from hanabi_common.sdnotify import notify, watchdog_interval
from hanabi_runtime.zygote import protocol as P
from hanabi_runtime.zygote.worker import Origin, run as run_worker

log = logging.getLogger("hanabi.zygote")
# What create, run and exec import (tests/integration/test_zygote.py checks that a create
# in a worker imports nothing more).
PRELOAD = (
    "hanabi_runtime.cli", "hanabi_runtime.lifecycle", "hanabi_runtime.execs", "hanabi_runtime.console",
    "hanabi_runtime.cgroups", "hanabi_runtime.hooks", "hanabi_runtime.guest_linux", "hanabi_runtime.pod",
    "hanabi_runtime.pods", "hanabi_runtime.clilog", "hanabi_runtime.teardown", "hanabi_runtime.state",
    "hanabi_runtime.lean.argv", "hanabi_runtime.lean.commands", "hanabi_runtime.lean.records",
    "hanabi_runtime.lean.toml", "hanabi_wire.ocispec.process", "hanabi_wire.ocispec.caps",
    "hanabi_wire.ocispec.seccomp",
    "hanabi_common.netns", "hanabi_common.oci", "hanabi_common.models.agentd", "hanabi_common.models.vmmd",
    "hanabi_common.models.netd", "hanabi_common.models.blockd", "hanabi_vmmd.client",
    "hanabi_agentd.client", "hanabi_netd.client", "hanabi_blockd.client", "zmq", "jsonschema",
    "concurrent.futures.thread", "tomllib", "resource",
)
OWN_PACKAGES = ("hanabi_",)  # whose source files a worker checks for changes


def preload() -> Origin:
    """Import PRELOAD and build the OCI schema validator; what is loaded now."""
    for name in PRELOAD:
        importlib.import_module(name)
    from hanabi_common import oci

    oci.schema_errors({})  # compiles the schema registry once, for every worker
    sources = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if name.startswith(OWN_PACKAGES) and path:
            try:
                sources[path] = os.stat(path).st_mtime_ns
            except OSError:
                continue
    return Origin(modules=frozenset(sys.modules), sources=sources)


def bind(path: Path) -> socket.socket:
    """Listen on `path` (mode 0600); a stale socket is replaced, a served one refused."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink(missing_ok=True)
    else:
        raise FailedPrecondition(f"a zygote already serves {path}")
    finally:
        probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old)
    listener.listen(64)
    return listener


def serve(config: Config, pid_file: Path | None = None) -> int:
    """Run the zygote until SIGTERM/SIGINT; the exit code."""
    config.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    origin = preload()
    path = Path(P.socket_path(config.run_dir))
    listener = bind(path)
    bound = os.stat(path).st_ino
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    stopping: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # workers are reaped by the kernel
    signal.set_wakeup_fd(wake_w)
    interval = watchdog_interval()
    if pid_file is not None:
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        pid_file.write_text(f"{os.getpid()}\n")
    notify("READY=1", f"STATUS=serving on {path}", f"MAINPID={os.getpid()}")
    log.info("ready", extra={"config": str(config.source) if config.source else "defaults",
                             "socket": str(path), "modules": len(origin.modules)})
    try:
        while not stopping:
            readable, _, _ = select.select([listener.fileno(), wake_r], [], [], interval)
            if interval is not None:
                notify("WATCHDOG=1")
            if wake_r in readable:
                _drain(wake_r)
            if listener.fileno() in readable:
                _fork_worker(listener, origin, [listener.fileno(), wake_r, wake_w])
        log.info("signal received, stopping", extra={"signal": signal.Signals(stopping[0]).name})
    finally:
        notify("STOPPING=1")
        listener.close()
        try:
            if os.stat(path).st_ino == bound:  # still ours, not a successor's
                path.unlink()
        except FileNotFoundError:
            pass
        if pid_file is not None:
            pid_file.unlink(missing_ok=True)
    return 0


def _fork_worker(listener: socket.socket, origin: Origin, inherited: list[int]) -> None:
    try:
        conn, _ = listener.accept()
    except OSError:
        return  # the client gave up already
    try:
        pid = os.fork()
    except OSError as exc:
        log.error("cannot fork a worker: the client runs its command itself", extra={"error": str(exc)})
        conn.close()
        return
    if pid == 0:
        run_worker(conn, origin, inherited)
    conn.close()


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass
