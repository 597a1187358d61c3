"""The runtime's own per-sandbox state file, state.json, and the OCI state it reports."""

from __future__ import annotations

import os
from pathlib import Path

from hanabi_common.state import VersionedState
from hanabi_runtime.procs import (OCI_VERSION, STATE_NAME, is_same_process_alive,  # noqa: F401
                                  oci_document, process_start_time)


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
    # A CRI app container: the id of its pod's sandbox container, whose VM it runs in
    # (hanabi_runtime.pod); None for a container with a VM of its own (a pod sandbox too).
    sandbox: str | None = None

    @property
    def vm_id(self) -> str:
        """The sandbox id the daemons know the container's VM by (its pod's, or its own)."""
        return self.sandbox or self.id


def oci_state(state: RuntimeState, status: str) -> dict:
    """The OCI state document `hanabi-runtime state` prints."""
    return oci_document(state.model_dump(), status)


def write_pid_file(path: str, pid: int) -> None:
    """Write the pid file atomically, as runc does (the shim reads it as 'created')."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    tmp.write_text(str(pid))
    os.replace(tmp, target)
