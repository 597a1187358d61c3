"""Save and load a QEMU VM's device state for VM templates (QMP only, no RAM copied).

The template's RAM lives in a file mapped shared (`memory-backend-file,share=on`); with
the `x-ignore-shared` migration capability QEMU skips such RAM and migrates only the
device state (about 300 KB). QEMU 7.2 has no `file:` migration URI and `exec:` would
spawn a shell, which `-sandbox spawn=deny` forbids, so the state file travels as an fd:
QMP `getfd` (SCM_RIGHTS) names it, `migrate fd:NAME` / `migrate-incoming fd:NAME` use it.
The fd name lives in the QMP session that passed it, so each step is one session.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from hanabi_common.errors import DeadlineExceeded, FailedPrecondition
from hanabi_vmmd.qmp import QmpClient

FD_NAME = "hanabi-template"
POLL_S = 0.005
IGNORE_SHARED = {"capabilities": [{"capability": "x-ignore-shared", "state": True}]}


def save_state(control_socket: Path, state_file: Path, timeout: float) -> int:
    """Stop the vCPUs and write the device state to `state_file`; its size in bytes."""
    deadline = time.monotonic() + timeout
    fd = os.open(state_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with QmpClient(control_socket, timeout=timeout) as qmp:
            qmp.execute("stop")
            qmp.execute("migrate-set-capabilities", IGNORE_SHARED)
            qmp.execute_with_fd("getfd", {"fdname": FD_NAME}, fd)
            qmp.execute("migrate", {"uri": f"fd:{FD_NAME}"})
            while True:
                info = qmp.execute("query-migrate") or {}
                status = info.get("status")
                if status == "completed":
                    break
                if status in ("failed", "cancelled"):
                    raise FailedPrecondition(f"QEMU could not save the template's state: "
                                             f"{info.get('error-desc', status)}")
                if time.monotonic() >= deadline:
                    raise DeadlineExceeded(f"saving the template's state took over {timeout:.0f}s")
                time.sleep(POLL_S)
        os.fsync(fd)
    finally:
        os.close(fd)
    return state_file.stat().st_size


def load_state(control_socket: Path, state_file: Path, timeout: float) -> None:
    """Feed `state_file` to a QEMU started with `-incoming defer`, wait until it is loaded,
    and start the vCPUs (`cont`)."""
    deadline = time.monotonic() + timeout
    fd = os.open(state_file, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with QmpClient(control_socket, timeout=timeout) as qmp:
            qmp.execute("migrate-set-capabilities", IGNORE_SHARED)
            qmp.execute_with_fd("getfd", {"fdname": FD_NAME}, fd)
            qmp.execute("migrate-incoming", {"uri": f"fd:{FD_NAME}"})
            while True:
                status = (qmp.execute("query-status") or {}).get("status")
                if status != "inmigrate":
                    break
                if time.monotonic() >= deadline:
                    raise DeadlineExceeded(f"loading the template's state took over {timeout:.0f}s")
                time.sleep(POLL_S)
            migration = (qmp.execute("query-migrate") or {}).get("status")
            if migration not in (None, "completed") or status not in ("paused", "postmigrate", "prelaunch",
                                                                      "running"):
                raise FailedPrecondition(f"QEMU did not load the template's state (VM {status}, "
                                         f"migration {migration})")
            if status != "running":
                qmp.execute("cont")
    finally:
        os.close(fd)
