"""Process facts from /proc, safe against pid reuse.

A VM process is identified by its pid *and* its start time (field 22 of /proc/<pid>/stat,
in clock ticks since boot): a pid that is alive with another start time belongs to some
other process and must never be signalled. Zombies count as gone.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from pathlib import Path

PROC = Path("/proc")


def _stat_fields(pid: int, proc: Path = PROC) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name, or None if there is no such pid."""
    try:
        data = (proc / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    end = data.rfind(")")
    if end < 0:
        return None
    return data[end + 2:].split()


def parse_stat(text: str) -> tuple[str, int]:
    """(state letter, start time) from the text of a /proc/<pid>/stat file."""
    end = text.rfind(")")
    rest = text[end + 2:].split()
    return rest[0], int(rest[19])


def start_time(pid: int, proc: Path = PROC) -> int | None:
    """The start time of `pid` in clock ticks since boot, or None if it does not exist."""
    fields = _stat_fields(pid, proc)
    if fields is None or len(fields) < 20:
        return None
    return int(fields[19])


def is_alive(pid: int, started: int | None, proc: Path = PROC) -> bool:
    """True if `pid` runs, is not a zombie, and (when given) has start time `started`."""
    if pid <= 0:
        return False
    fields = _stat_fields(pid, proc)
    if fields is None or len(fields) < 20:
        return False
    if fields[0] in ("Z", "X", "x"):
        return False
    return started is None or int(fields[19]) == started


def cmdline(pid: int, proc: Path = PROC) -> list[str]:
    """The argv of `pid` (empty if gone or a kernel thread)."""
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def kill_verified(pid: int, started: int | None, sig: int = signal.SIGKILL) -> bool:
    """Send `sig` to `pid` only if it is still the same process; True if sent.

    A pidfd pins the process between the check and the signal, so a pid recycled in
    between cannot be hit.
    """
    try:
        fd = os.pidfd_open(pid)
    except (ProcessLookupError, OSError):
        return False
    try:
        if not is_alive(pid, started):
            return False
        signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)


def wait_exited(pid: int, timeout: float) -> bool:
    """Wait up to `timeout` for our child `pid` to exit (a zombie, not reaped: its pid cannot
    be another process's yet); True if it did. Woken by its pidfd as it exits, not by a
    poll: `Popen.wait(timeout)` sleeps 1, 2, 4... ms between looks, up to twice as late."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(max(timeout, 0.0) * 1000))
    finally:
        os.close(fd)


def wait_gone(pid: int, started: int | None, timeout: float, interval: float = 0.02) -> bool:
    """Wait until the process is gone (or a zombie); True if it went within `timeout`."""
    end = time.monotonic() + timeout
    while is_alive(pid, started):
        if time.monotonic() >= end:
            return False
        time.sleep(interval)
    return True


def exit_status(returncode: int | None) -> int | None:
    """A Popen return code as a shell-style status: 128+N when killed by signal N."""
    if returncode is None:
        return None
    return 128 - returncode if returncode < 0 else returncode


def reap(process: subprocess.Popen, timeout: float = 5.0) -> int | None:
    """The shell-style exit status of a child known to have exited (None if it has not).

    `Popen.poll()` answers None while another thread holds the Popen's wait lock, so a
    child that is known to be gone is waited for instead.
    """
    try:
        return exit_status(process.wait(timeout))
    except subprocess.TimeoutExpired:
        return None


def set_idle_priority(pid: int, idle: bool, proc: Path = PROC) -> None:
    """Put every thread of `pid` in SCHED_IDLE (runs only on a CPU nothing else wants), or
    back in SCHED_OTHER at niceness 0 (the policy is per thread in Linux; a thread made
    later inherits its creator's); threads gone meanwhile are skipped, any other refusal
    (PermissionError without CAP_SYS_NICE) is raised."""
    try:
        tids = [int(entry.name) for entry in (proc / str(pid) / "task").iterdir() if entry.name.isdigit()]
    except OSError:
        return
    policy = os.SCHED_IDLE if idle else os.SCHED_OTHER
    for tid in tids:
        try:
            os.sched_setscheduler(tid, policy, os.sched_param(0))
            if not idle:
                os.setpriority(os.PRIO_PROCESS, tid, 0)
        except ProcessLookupError:
            pass
