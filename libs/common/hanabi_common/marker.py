"""The runtime's half of a delete while daemons are down, in the standard library only (the
lean CLI's `delete` imports no pydantic): which state file is whose, and `disown`.

`hanabi_common.disowned` holds the daemons' half (each one's reconcile at start) and the
`Disowned` model of the marker written here (tests/unit/test_common_disowned.py checks the
marker validates as that model).
"""

from __future__ import annotations

import json
import os
import shutil
import time

from hanabi_common.atomic import write_atomic

DISOWNED_NAME = "disowned"
MARKER_SCHEMA_VERSION = 1  # hanabi_common.disowned.Disowned (a VersionedState)
# Each daemon's state file in a sandbox directory.
DAEMON_STATE_NAMES = {"agentd": "agent", "vmmd": "hypervisor", "blockd": "devices", "netd": "network"}


def mark(directory: str, sandbox_id: str, pending: list[str]) -> None:
    """Write the marker of a sandbox whose daemons in `pending` could not be reached."""
    body = {"schema_version": MARKER_SCHEMA_VERSION, "container_id": sandbox_id,
            "deleted_at": time.time(), "pending": sorted(pending)}
    write_atomic(os.path.join(directory, f"{DISOWNED_NAME}.json"), json.dumps(body, indent=1).encode())


def disown(sandboxes_dir: str, sandbox_id: str, pending: list[str]) -> bool:
    """Remove everything of the sandbox's directory but the state files of the daemons in
    `pending` (they are down), and mark it if any of those files is there. True when the
    sandbox is left marked for them; False when nothing was left (the directory is gone)."""
    keep = {f"{DAEMON_STATE_NAMES[name]}.json" for name in pending}
    directory = os.path.join(sandboxes_dir, sandbox_id)
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return False
    for entry in entries:
        if entry.name in keep:
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                pass
    if any(os.path.exists(os.path.join(directory, name)) for name in keep):
        mark(directory, sandbox_id, pending)
        return True
    try:
        os.rmdir(directory)
    except OSError:
        pass
    return False
