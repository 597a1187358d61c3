"""The runtime's own per-sandbox state file, state.json, and the OCI state it reports."""

from __future__ import annotations

import os
from pathlib import Path

from hanabi_common.state import VersionedState

STATE_NAME = "state"
OCI_VERSION = "1.0.2"


class RuntimeState(VersionedState):
    """What `create` recorded about a container."""

    id: str
    bundle: str
    rootfs: str
    created_at: float
    standin_pid: int | None = None
    standin_start_time: int | None = None
    started: bool = False
    paused: bool = False
    annotations: dict[str, str] = {}
    root: str | None = None
    timings: dict[str, float] = {}
    cgroups: list[str] = []
    oci_version: str = "1.0.2"
    hooks: dict[str, list[dict]] = {}  # poststart and poststop, for start and delete


def process_start_time(pid: int) -> int | None:
    """The start time of a process (clock ticks since boot), to tell it from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return int(fields[19])


def is_same_process_alive(pid: int | None, start_time: int | None) -> bool:
    """True when `pid` still runs and is the process that was recorded."""
    if not pid:
        return False
    current = process_start_time(pid)
    if current is None:
        return False
    try:
        with open(f"/proc/{pid}/stat") as handle:
            if handle.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
    except OSError:
        return False
    return start_time is None or current == start_time


def oci_state(state: RuntimeState, status: str) -> dict:
    """The OCI state document `hanabi-runtime state` prints."""
    return {
        "ociVersion": OCI_VERSION,
        "id": state.id,
        "status": status,
        "pid": state.standin_pid if status in ("created", "running") else 0,
        "bundle": state.bundle,
        "rootfs": state.rootfs,
        "created": state.created_at,
        "annotations": state.annotations,
        "owner": "",
    }


def write_pid_file(path: str, pid: int) -> None:
    """Write the pid file atomically, as runc does (the shim reads it as 'created')."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    tmp.write_text(str(pid))
    os.replace(tmp, target)
