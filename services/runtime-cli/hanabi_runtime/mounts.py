"""Which of an OCI config's mounts reach the guest, and how (pure planning).

A bind mount's source is shared live with the VM: blockd bind-mounts it into the VM's 9P
export root (read-only there too for `ro`), and the guest agent bind-mounts it from its
share mount, so writes reach the host at once and host changes are seen. On a VM without a
file share (Firecracker today) blockd copies each source onto a small second disk instead
(the container then sees the content as of create; its writes stay in the VM).
tmpfs mounts are made in the guest. The agent itself provides /proc, /sys, /dev,
/dev/pts, /dev/shm (and Docker's mqueue and cgroup mounts have no meaning in the VM).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

from hanabi_common.errors import InvalidArgument

AGENT_PROVIDED = frozenset({"/proc", "/sys", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue",
                            "/sys/fs/cgroup"})
SKIPPED_TYPES = frozenset({"proc", "sysfs", "devpts", "mqueue", "cgroup", "cgroup2"})
BIND_OPTIONS = frozenset({"ro", "rw", "nosuid", "nodev", "noexec", "rbind", "bind"})
TMPFS_FLAGS = frozenset({"ro", "rw", "nosuid", "nodev", "noexec"})
TMPFS_DATA_KEYS = ("size=", "mode=", "nr_inodes=", "uid=", "gid=")


@dataclass
class MountPlan:
    """Binds to share (name, host source, read-only) and the mounts the agent makes."""

    binds: list[tuple[str, str, bool]] = field(default_factory=list)
    guest: list[dict] = field(default_factory=list)


def _destination(mount: dict) -> str:
    destination = mount.get("destination", "")
    if not destination.startswith("/"):
        raise InvalidArgument(f"mount destination {destination!r} must be an absolute path")
    if ".." in destination.split("/"):
        raise InvalidArgument(f"mount destination {destination!r} must not contain '..'")
    return posixpath.normpath(destination)


def _is_bind(mount: dict) -> bool:
    return mount.get("type") == "bind" or bool({"bind", "rbind"} & set(mount.get("options") or []))


def plan_mounts(mounts: list[dict] | None) -> MountPlan:
    """Split `mounts` into binds to copy and mounts for the guest; refuse what cannot work."""
    plan = MountPlan()
    for mount in mounts or []:
        destination = _destination(mount)
        kind = mount.get("type", "")
        options = list(mount.get("options") or [])
        if destination in AGENT_PROVIDED or kind in SKIPPED_TYPES:
            continue
        if _is_bind(mount):
            source = mount.get("source", "")
            if not source.startswith("/"):
                raise InvalidArgument(f"bind mount at {destination} needs an absolute source, got {source!r}")
            name = f"m{len(plan.binds)}"
            plan.binds.append((name, source, "ro" in options))
            plan.guest.append({"destination": destination, "type": "bind", "source": name,
                               "options": [o for o in options if o in BIND_OPTIONS]})
        elif kind == "tmpfs":
            kept = [o for o in options if o in TMPFS_FLAGS or o.startswith(TMPFS_DATA_KEYS)]
            plan.guest.append({"destination": destination, "type": "tmpfs", "source": None,
                               "options": kept})
        else:
            raise InvalidArgument(f"mount of type {kind!r} at {destination} cannot be made in a VM "
                                  "(hanabi supports bind and tmpfs mounts)")
    return plan
