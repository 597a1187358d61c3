"""Pure helpers about a container's host processes and its OCI state (standard library and
hanabi_common.errors only).

Shared by the full CLI (through `hanabi_runtime.state`) and the lean hot paths, which must
not import pydantic.
"""

from __future__ import annotations

import os

STATE_NAME = "state"
OCI_VERSION = "1.0.2"


def process_start_time(pid: int) -> int | None:
    """The start time of a process (clock ticks since boot), to tell it from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            stat = handle.read()
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


def oci_document(state: dict, status: str) -> dict:
    """The OCI state document `hanabi-runtime state` prints, from state.json's fields."""
    return {
        "ociVersion": OCI_VERSION,
        "id": state["id"],
        "status": status,
        "pid": state["standin_pid"] if status in ("created", "running") else 0,
        "bundle": state["bundle"],
        "rootfs": state["rootfs"],
        "created": state["created_at"],
        "annotations": state["annotations"],
        "owner": "",
    }


# The fifo in the sandbox dir a created container's stand-in waits on; a byte written
# there tells it the container started.
START_FIFO = "start.fifo"


def release_standin(fifo: str | os.PathLike, cid: str) -> None:
    """Tell the stand-in of `cid` (waiting on its START_FIFO) that its process started."""
    from hanabi_common.errors import Internal

    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise Internal(f"the stand-in of {cid} is gone ({exc}); its output is lost") from None
    try:
        os.write(fd, b"s")
    finally:
        os.close(fd)
