"""Who starts the runtime's stand-in processes and reaps them.

A stand-in must be a child of the `hanabi-runtime` process the caller ran: containerd's
shim and conmon are subreapers, and they become its parent when the CLI exits (they wait
for it to learn the container's exit). A CLI process does that itself (`LocalSpawner`, the
default). A zygote worker (`hanabi_runtime.zygote`) runs a command on behalf of a CLI
process, so it asks that process to spawn and reap (`zygote.worker.ClientSpawner`).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Protocol
from collections.abc import Mapping

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


class Spawner(Protocol):
    """Starts and reaps stand-ins."""

    def spawn(self, argv: list[str], fds: Mapping[int, int], setsid: bool) -> int:
        """Start `sys.executable` with `argv`; the child's fd `target` is our fd `fds[target]`
        (the argv names the targets); its pid."""

    def wait(self, pid: int, forward_signals: bool = False) -> int:
        """Reap `pid`: its exit code, or -N when signal N killed it (like Popen.returncode).
        `forward_signals`: SIGINT, SIGTERM, SIGHUP and SIGQUIT received meanwhile go to it."""


def spawn_here(argv: list[str], fds: Mapping[int, int], setsid: bool) -> int:
    """posix_spawn `sys.executable` with `argv`, giving it `fds` as `LocalSpawner.spawn` says."""
    actions = []
    moved = []
    try:
        floor = max([*fds, 2]) + 1
        for target, source in fds.items():
            if target == source:
                os.set_inheritable(source, True)
                continue
            high = _dup_above(source, floor)  # no dup2 below may overwrite a source
            moved.append(high)
            actions.append((os.POSIX_SPAWN_DUP2, high, target))
        return os.posix_spawn(sys.executable, argv, os.environ, file_actions=actions, setsid=setsid)
    finally:
        for fd in moved:
            os.close(fd)


def _dup_above(fd: int, floor: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor)


def forward_signals(pid: int, seen: list[int] | None = None) -> None:
    """From now on FORWARDED_SIGNALS received here go to `pid` (each appended to `seen`)."""
    def forward(signum: int, _frame: object) -> None:
        if seen is not None:
            seen.append(signum)
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, forward)


def wait_here(pid: int, forward: bool = False) -> int:
    """waitpid `pid` (our child), as `Spawner.wait` says."""
    if forward:
        forward_signals(pid)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


class LocalSpawner:
    """This process starts and reaps its stand-ins."""

    def spawn(self, argv: list[str], fds: Mapping[int, int], setsid: bool) -> int:
        return spawn_here(argv, fds, setsid)

    def wait(self, pid: int, forward_signals: bool = False) -> int:
        return wait_here(pid, forward_signals)


_current: Spawner = LocalSpawner()


def current() -> Spawner:
    """The spawner of this process."""
    return _current


def use(spawner: Spawner) -> None:
    """Make `spawner` this process's (a zygote worker, once, before it runs a command)."""
    global _current
    _current = spawner
