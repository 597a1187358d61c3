"""The process side of a `VmHandle`, the same for every backend: is the VMM alive, wait
for it to exit, SIGKILL and reap it, and the tail of its stderr log for error messages.

A handle carries the `Popen` when this vmmd spawned the VMM (then the exit status can be
read); an adopted VMM is known by pid and start time only (see `proc`).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path

from hanabi_common.errors import Unavailable
from hanabi_vmmd import proc
from hanabi_vmmd.hypervisor import VmHandle

log = logging.getLogger("hanabi.vmmd")
STDERR_TAIL_BYTES = 2000
KILL_WAIT_S = 5.0


def stderr_tail(path: Path, limit: int = STDERR_TAIL_BYTES) -> str:
    """The last `limit` bytes of a VMM's log, decoded, stripped ('' if there is none)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(handle.tell() - limit, 0))
            return handle.read().decode(errors="replace").strip()
    except OSError:
        return ""


def spawn(argv: list[str], cwd: Path, stderr_log: Path, what: str, **popen: object) -> subprocess.Popen:
    """Start a VMM in a session of its own (it outlives a vmmd restart), stdin from
    /dev/null, stdout and stderr into `stderr_log`; Unavailable naming `what` if it cannot run."""
    with open(stderr_log, "wb") as errlog:
        try:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=errlog, stderr=errlog, cwd=cwd,
                                    start_new_session=True, close_fds=True, **popen)  # type: ignore[arg-type]
        except OSError as exc:
            raise Unavailable(f"cannot run {what} {argv[0]!r}: {exc.strerror or exc}") from None


def is_alive(handle: VmHandle) -> bool:
    """True while the VMM runs (same pid and start time, not a zombie)."""
    if handle.process is not None and handle.process.poll() is not None:
        return False
    return proc.is_alive(handle.pid, handle.start_time)


def wait_exit(handle: VmHandle, timeout: float) -> bool:
    """Wait up to `timeout` for the VMM to end (reaping our own child); True if it did."""
    if handle.process is not None:
        try:
            handle.process.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    return proc.wait_gone(handle.pid, handle.start_time, timeout)


def kill_and_reap(handle: VmHandle) -> int | None:
    """SIGKILL the VMM (if it is still the same process) and reap it; its wait status when
    this vmmd is its parent."""
    proc.kill_verified(handle.pid, handle.start_time or None, signal.SIGKILL)
    if handle.process is not None:
        try:
            return handle.process.wait(KILL_WAIT_S)
        except subprocess.TimeoutExpired:
            log.error("vmm did not die after SIGKILL", extra={"sandbox": handle.sandbox_id, "pid": handle.pid})
            return None
    proc.wait_gone(handle.pid, handle.start_time, KILL_WAIT_S)
    return None
