"""The container's host cgroup: where its VM and stand-ins are accounted.

Docker names a cgroup for each container (`linux.cgroupsPath`: `/docker/<id>`, or with
--systemd-cgroup `system.slice:docker:<id>`), and containerd's shim reads the cgroup of the
pid in the pid file for `docker stats`. hanabi puts the VMM process and the stand-ins there,
so the figures are what the container really costs the host. No limits are written: the
VM's size already bounds the guest, and a memory limit below the VMM's own footprint would
have the host kill the whole VM. Works on cgroup v1 (every mounted controller) and v2.
`remove` is on the lean `delete`'s path: pathlib and logging are imported where used.
"""

from __future__ import annotations

import os
import time

from hanabi_common.errors import InvalidArgument

TYPE_CHECKING = False
if TYPE_CHECKING:
    from logging import Logger
    from pathlib import Path

CGROUP_ROOT = "/sys/fs/cgroup"


def _log() -> Logger:
    import logging

    return logging.getLogger("hanabi.runtime.cgroups")


def normalize(cgroups_path: str) -> str:
    """The cgroup's path below a hierarchy's root; systemd's `slice:prefix:name` form too."""
    if cgroups_path.count(":") == 2 and not cgroups_path.startswith("/"):
        slice_, prefix, name = cgroups_path.split(":")
        parts = [p for p in (slice_ or "system.slice").split("/") if p]
        parts.append(f"{prefix}-{name}.scope" if prefix else f"{name}.scope")
        path = "/".join(parts)
    else:
        path = cgroups_path.strip("/")
    segments = path.split("/")
    if not path or any(s in ("", ".", "..") for s in segments):
        raise InvalidArgument(f"linux.cgroupsPath {cgroups_path!r} is not a usable cgroup path")
    return path


def hierarchies(root: Path | str = CGROUP_ROOT) -> list[Path]:
    """The roots to create the cgroup in: the v2 root, or each mounted v1 controller."""
    from pathlib import Path

    root = Path(root)
    if (root / "cgroup.controllers").exists():
        return [root]
    found = []
    if root.is_dir():
        for entry in sorted(root.iterdir()):
            if entry.is_dir() and not entry.is_symlink() and (entry / "cgroup.procs").exists():
                found.append(entry)
    return found


def place(relative: str, pids: list[int], root: Path | str = CGROUP_ROOT) -> list[str]:
    """Create the cgroup in every hierarchy and move `pids` into it; returns the dirs made
    (all of them, also where a move failed, so that `remove` cleans them up)."""
    made = []
    for hierarchy in hierarchies(root):
        directory = hierarchy / relative
        try:
            _make(directory)
        except OSError as exc:
            _log().warning("could not create cgroup", extra={"path": str(directory), "error": str(exc)})
            continue
        made.append(str(directory))
        _prepare(directory)
        join([str(directory)], *pids)
    return made


def _make(directory: Path) -> None:
    """mkdir -p, then give every v1 cpuset group on the path the cpus and mems of its
    parent where it has none (a new one starts empty, and an empty one refuses processes)."""
    directory.mkdir(parents=True, exist_ok=True)
    for path in reversed([directory, *directory.parents]):
        _inherit_cpuset(path)


def _inherit_cpuset(directory: Path) -> None:
    for name in ("cpuset.cpus", "cpuset.mems"):
        target = directory / name
        if target.exists() and (directory.parent / name).exists() and not target.read_text().strip():
            target.write_text((directory.parent / name).read_text())


def _prepare(directory: Path) -> None:
    """v1 memory: bring along the memory the VM already has charged elsewhere (best effort)."""
    move_charge = directory / "memory.move_charge_at_immigrate"
    if move_charge.exists():
        try:
            move_charge.write_text("3\n")
        except OSError as exc:
            _log().debug("move_charge_at_immigrate not set", extra={"error": str(exc)})


def remove(directories: list[str], timeout: float = 2.0) -> list[str]:
    """Remove the cgroups (retrying while exiting processes leave); returns what stayed."""
    left = []
    for directory in directories:
        deadline = time.monotonic() + timeout
        while True:
            try:
                os.rmdir(directory)
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    _log().warning("cgroup not removed", extra={"path": directory, "error": str(exc)})
                    left.append(directory)
                    break
                time.sleep(0.05)
    return left


def join(directories: list[str], *pids: int) -> None:
    """Move processes (the VM, stand-ins) into cgroups made by `place`."""
    for directory in directories:
        for pid in pids:
            try:
                with open(os.path.join(directory, "cgroup.procs"), "w") as procs:
                    procs.write(f"{pid}\n")
            except OSError as exc:
                _log().warning("could not join cgroup", extra={"path": directory, "pid": pid, "error": str(exc)})
