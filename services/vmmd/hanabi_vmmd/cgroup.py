"""Put a VM's process into the container's host cgroups as soon as it exists.

Memory is charged to the cgroup a page is first touched in, and on cgroup v1 (and v2)
charges do not follow a process that moves later: a VM moved after its boot leaves its
guest memory charged to vmmd, and `docker stats` shows almost nothing. So the runtime
makes the cgroups first and vmmd writes the VMM's pid into them right after spawning it,
before the guest touches its memory. Only directories under /sys/fs/cgroup are written.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from hanabi_common.errors import InvalidArgument

log = logging.getLogger("hanabi.vmmd.cgroup")
CGROUP_ROOT = "/sys/fs/cgroup"


def checked_dirs(dirs: list[str]) -> list[Path]:
    """The cgroup directories, each resolved and under /sys/fs/cgroup with a cgroup.procs
    file (InvalidArgument otherwise)."""
    result = []
    for raw in dirs:
        path = Path(os.path.realpath(raw))
        if not str(path).startswith(CGROUP_ROOT + "/") or not (path / "cgroup.procs").is_file():
            raise InvalidArgument(f"{raw} is not a cgroup directory under {CGROUP_ROOT}")
        result.append(path)
    return result


def join(pid: int, dirs: list[Path]) -> list[str]:
    """Move `pid` into every cgroup of `dirs`; the ones that refused it (logged)."""
    refused = []
    for directory in dirs:
        try:
            (directory / "cgroup.procs").write_text(f"{pid}\n")
        except OSError as exc:
            log.warning("vm not moved into its cgroup", extra={"pid": pid, "path": str(directory),
                                                              "error": str(exc)})
            refused.append(str(directory))
    return refused
