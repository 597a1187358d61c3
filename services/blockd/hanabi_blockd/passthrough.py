"""Passthrough: a bundle rootfs that is a block device's mount goes to the VM as that device.

Docker's devicemapper driver (and anyone who mounts a loop device at the bundle's rootfs)
hands us a mounted filesystem. Kata 1.x hot-plugs such a device while it stays mounted on
the host; that is only safe as long as the host never touches the mount, and any host
access (`docker cp`, `docker diff`, a backup walking /var/lib/docker, even the superblock
written back at unmount) then corrupts a filesystem the guest mounts read-write at the same
time: ext4 is not a cluster filesystem. hanabi therefore takes the device from the host
before the VM gets it, and gives it back after:

* it passes through only when the rootfs *is* the mount point of the whole device (mount
  root `/`), the fstype is one the guest mounts (ext4), and the device has no other mount
  on the host (we would not be able to take those away);
* it unmounts the rootfs (never lazily: a busy mount stays, and the rootfs is copied
  instead), checks no process holds the device open, and records the mount (device,
  fstype, options) in devices.json;
* at release, once no process holds the device any more (the VM is stopped), it mounts the
  device back where it was with the same options, so the bundle is as its owner left it
  (Docker's driver unmounts it itself on `docker rm`).

Whenever passthrough is refused the service falls back to the loop-file path (a copy): the
reason is logged and reported in the volume's `detail`.
"""

from __future__ import annotations

import os
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from hanabi_blockd.mountinfo import MountEntry, mount_at, mounts_of_device
from hanabi_common.errors import FailedPrecondition, Internal

GUEST_FSTYPES = ("ext4",)
MOUNT_FLAGS = ("ro", "rw", "nosuid", "nodev", "noexec", "noatime", "nodiratime", "relatime",
               "strictatime", "sync", "dirsync")


@dataclass(frozen=True)
class Passthrough:
    """A block device to take from the host mount at `mount_point` and give to the VM."""

    device: str
    major: int
    minor: int
    fstype: str
    mount_point: str
    options: str


def decide(rootfs: str, entries: list[MountEntry], device_numbers) -> tuple[Passthrough | None, str]:
    """Whether the (resolved) `rootfs` can pass through, and why (pure but for the
    `device_numbers(path) -> (major, minor) | None` probe of the mount source)."""
    mount = mount_at(rootfs, entries)
    if mount is None:
        parent = mount_at(os.path.dirname(rootfs), entries)
        if parent is not None and parent.source.startswith("/dev/") and device_numbers(parent.source):
            # Docker's devicemapper driver: device mounted at mnt/<id>, rootfs is mnt/<id>/rootfs.
            return None, (f"the rootfs is the {os.path.basename(rootfs)}/ subdirectory of {parent.source} "
                          "mounted at its parent; the guest mounts a whole device as the root")
        return None, "the rootfs is not a mount point"
    numbers = device_numbers(mount.source) if mount.source.startswith("/dev/") else None
    if numbers is None:
        return None, f"the rootfs is a {mount.fstype} mount, not a block device's"
    if mount.root != "/":
        return None, f"only {mount.root} of {mount.source} is mounted there; the guest mounts a whole device"
    if mount.fstype not in GUEST_FSTYPES:
        return None, f"{mount.source} holds {mount.fstype}; the guest mounts {', '.join(GUEST_FSTYPES)} only"
    others = [e.mount_point for e in mounts_of_device(numbers[0], numbers[1], entries)
              if e.mount_point != rootfs]
    if others:
        return None, f"{mount.source} is also mounted at {others[0]}: it cannot be taken from the host"
    options = ",".join(o for o in mount.options if o in MOUNT_FLAGS) or "rw"
    return Passthrough(device=os.path.realpath(mount.source), major=numbers[0], minor=numbers[1],
                       fstype=mount.fstype, mount_point=rootfs, options=options), "block device mount"


def device_numbers(path: str) -> tuple[int, int] | None:
    """(major, minor) of a block device node, or None if `path` is not one."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISBLK(st.st_mode):
        return None
    return os.major(st.st_rdev), os.minor(st.st_rdev)


def holders(major: int, minor: int) -> list[int]:
    """Pids of processes holding the block device major:minor open (a VM, mkfs, fsck...)."""
    wanted = os.makedev(major, minor)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(fd)
            except OSError:
                continue
            if stat.S_ISBLK(st.st_mode) and st.st_rdev == wanted:
                found.append(int(entry.name))
                break
    return found


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise FailedPrecondition(f"{argv[0]} not found: install util-linux") from None


def take(plan: Passthrough) -> str | None:
    """Unmount the rootfs so only the VM will use the device; None if done, else why not
    (the mount is then as it was)."""
    done = _run(["umount", plan.mount_point])
    if done.returncode != 0:
        return f"cannot unmount {plan.mount_point}: {done.stderr.strip()[-200:]}"
    busy = holders(plan.major, plan.minor)
    if busy:
        give_back(plan)
        return f"{plan.device} is held open by pid {busy[0]}"
    return None


def give_back(plan: Passthrough) -> None:
    """Mount the device at its old place again, once nothing holds it."""
    busy = holders(plan.major, plan.minor)
    if busy:
        raise FailedPrecondition(f"{plan.device} is still held open by pid {busy[0]} (is the VM "
                                 f"stopped?): not mounting it back at {plan.mount_point} yet")
    if not os.path.exists(plan.device):
        raise FailedPrecondition(f"{plan.device} is gone: cannot mount it back at {plan.mount_point}")
    done = _run(["mount", "-t", plan.fstype, "-o", plan.options, plan.device, plan.mount_point])
    if done.returncode != 0:
        raise Internal(f"mounting {plan.device} back at {plan.mount_point} failed: "
                       f"{done.stderr.strip()[-300:]}")
