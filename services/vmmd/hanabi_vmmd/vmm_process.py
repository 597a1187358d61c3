"""The process side of a `VmHandle`, the same for every backend: spawn the VMM, is it
alive, wait for it to exit, stop it (ask, wait, SIGKILL, reap), and the tail of its
stderr log for error messages.

A handle carries the `Popen` when this vmmd spawned the VMM (then the exit status can be
read); an adopted VMM is known by pid and start time only (see `proc`).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

from hanabi_common.errors import HanabiError, Unavailable
from hanabi_vmmd import proc
from hanabi_vmmd.hypervisor import StopResult, VmHandle

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


def spawn(argv: list[str], cwd: Path, stderr_log: Path, what: str, **popen: Any) -> subprocess.Popen:
    """Start a VMM in a session of its own (it outlives a vmmd restart), stdin from
    /dev/null, stdout and stderr into `stderr_log`; Unavailable naming `what` if it cannot run."""
    with open(stderr_log, "wb") as errlog:
        try:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=errlog, stderr=errlog, cwd=cwd,
                                    start_new_session=True, close_fds=True, **popen)
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
        if handle.process.returncode is None and not proc.wait_exited(handle.pid, KILL_WAIT_S):
            log.error("vmm did not die after SIGKILL", extra={"sandbox": handle.sandbox_id, "pid": handle.pid})
            return None
        return handle.process.wait()  # a zombie by now: reaped at once
    proc.wait_gone(handle.pid, handle.start_time, KILL_WAIT_S)
    return None


def stop(handle: VmHandle, timeout: float, ask_to_end: Callable[[float], None], what: str) -> StopResult:
    """End a VMM: `ask_to_end(seconds)` (QMP quit, SendCtrlAltDel...), wait up to `timeout`,
    then SIGKILL; always reap our own child."""
    if not is_alive(handle):
        code = handle.process.wait() if handle.process is not None else None
        return StopResult(was_running=False, exit_status=proc.exit_status(code), killed=False)
    deadline = time.monotonic() + timeout
    try:
        ask_to_end(min(timeout, 2.0))
    except HanabiError as exc:
        log.info(f"{what} was not asked to end, will kill", extra={"sandbox": handle.sandbox_id, "error": exc.message})
    killed = False
    if not wait_exit(handle, max(deadline - time.monotonic(), 0.1)):
        log.warning(f"{what} did not end in time, sending SIGKILL",
                    extra={"sandbox": handle.sandbox_id, "pid": handle.pid, "timeout_s": timeout})
        killed = True
        kill_and_reap(handle)
    code = handle.process.wait() if handle.process is not None else None
    return StopResult(was_running=True, exit_status=proc.exit_status(code), killed=killed)
