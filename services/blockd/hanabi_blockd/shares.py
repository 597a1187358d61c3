"""Live file shares: a container's rootfs and bind-mount sources, bind-mounted on the host
into its VM's 9P export root, so the guest works on the host directories themselves.

Layout under the export root vmmd made for the VM (`VmInfo.share_dir`)::

    <share_root>/<container_id>/rootfs   rbind of the rootfs directory
    <share_root>/<container_id>/m0..mN   rbind of each bind-mount source (a file for a file)

A bind the container gets read-only is also made read-only here, on the host, so not even a
hostile guest can write through it. Every new mount is made private at once: it neither
sends nor receives mount events (as Docker's default `rprivate` binds under runc).

What will be made is recorded (the caller persists `ShareRecord` before `attach` mounts
anything), so a release, or a reconcile after a crash, undoes exactly that: umount (lazily
when busy), then rmdir/unlink of the empty mount points. Nothing here ever removes a tree
recursively: under a mount point is the user's data.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from hanabi_common.errors import FailedPrecondition, InvalidArgument
from hanabi_blockd.mountinfo import read_mountinfo

log = logging.getLogger("hanabi.blockd.shares")

MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
ROOTFS_NAME = "rootfs"

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class ShareEntry:
    """One host path to expose in the share: `name` (rootfs, m0..) and whether the
    container gets it read-only."""

    name: str
    source: Path
    readonly: bool = False


def _mount(source: str | None, target: str, flags: int) -> None:
    ret = _libc.mount(source.encode() if source else None, target.encode(), None, flags, None)
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source or ''} on {target}: {os.strerror(err)}")


def _umount(target: str) -> None:
    if _libc.umount2(target.encode(), 0) == 0:
        return
    err = ctypes.get_errno()
    if err == errno.EINVAL:  # not (or no longer) a mount point
        return
    if _libc.umount2(target.encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err != errno.EINVAL:
            raise OSError(err, f"umount {target}: {os.strerror(err)}")


def check_source(source: Path) -> bool:
    """True for a directory, False for a regular file; InvalidArgument for anything else
    (a Unix socket, device or fifo on the host has no meaning inside another kernel)."""
    try:
        mode = source.stat().st_mode
    except FileNotFoundError:
        raise InvalidArgument(f"bind mount source {source} does not exist") from None
    if stat.S_ISDIR(mode):
        return True
    if stat.S_ISREG(mode):
        return False
    raise InvalidArgument(f"bind mount source {source} is not a file or a directory "
                          "(sockets, devices and fifos cannot be shared with a VM)")


def container_dir(share_root: Path, container_id: str) -> Path:
    """Where one container's entries live in the export root."""
    return Path(share_root) / container_id


def attach(share_root: Path, container_id: str, entries: list[ShareEntry]) -> None:
    """Bind every entry into `<share_root>/<container_id>/`; undo all on failure."""
    root = Path(share_root)
    if not root.is_dir():
        raise FailedPrecondition(f"the VM's share root {root} does not exist (was the VM stopped?)")
    kinds = [check_source(entry.source) for entry in entries]
    cdir = container_dir(root, container_id)
    cdir.mkdir(mode=0o700, exist_ok=True)
    done: list[ShareEntry] = []
    try:
        for entry, is_dir in zip(entries, kinds, strict=True):
            target = cdir / entry.name
            if is_dir:
                target.mkdir(mode=0o755, exist_ok=True)
            else:
                target.touch(mode=0o644, exist_ok=True)
            done.append(entry)
            _mount(str(entry.source), str(target), MS_BIND | MS_REC)
            _mount(None, str(target), MS_PRIVATE | MS_REC)
            if entry.readonly:
                _mount(None, str(target), MS_BIND | MS_REMOUNT | MS_RDONLY)
    except OSError as exc:
        detach(root, container_id, [e.name for e in done])
        raise FailedPrecondition(f"sharing {exc.filename or ''} with the VM failed: {exc}") from None


def detach(share_root: Path, container_id: str, names: list[str]) -> list[str]:
    """Unmount and remove the named entries and the container's dir; return what could not
    be removed (still busy). Idempotent: missing entries are fine."""
    cdir = container_dir(Path(share_root), container_id)
    left = []
    mounted = {e.mount_point for e in read_mountinfo()}
    for name in names:
        target = cdir / name
        try:
            while str(target) in mounted:  # stacked binds (a retried attach): all of them
                _umount(str(target))
                mounted = {e.mount_point for e in read_mountinfo()}
            if target.is_dir() and not target.is_symlink():
                target.rmdir()
            elif target.exists():
                if target.stat().st_size == 0:
                    target.unlink()
                else:  # never delete data: a non-empty file here is not our mount point
                    left.append(str(target))
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("share entry not removed", extra={"path": str(target), "error": str(exc)})
            left.append(str(target))
    try:
        cdir.rmdir()
    except FileNotFoundError:
        pass
    except OSError as exc:
        left.append(f"{cdir} ({exc.strerror})")
    return left


def unclaimed_mounts(shares_dir: Path, claimed: set[str]) -> list[str]:
    """Mount points under `shares_dir` that no record claims (a sandbox whose state went
    before its release did), deepest first."""
    prefix = str(shares_dir).rstrip("/") + "/"
    points = [e.mount_point for e in read_mountinfo() if e.mount_point.startswith(prefix)]
    return sorted((p for p in points if p not in claimed), key=len, reverse=True)


def remove_unclaimed(shares_dir: Path, claimed: set[str]) -> list[str]:
    """Unmount (lazily when busy) and remove the mount points no record claims."""
    removed = []
    for point in unclaimed_mounts(shares_dir, claimed):
        try:
            _umount(point)
            target = Path(point)
            if target.is_dir():
                target.rmdir()
            elif target.exists() and target.stat().st_size == 0:
                target.unlink()
            removed.append(point)
        except OSError as exc:
            log.warning("leftover share mount not removed", extra={"path": point, "error": str(exc)})
    return removed


def remove_root_if_empty(share_root: Path) -> None:
    """rmdir the export root once the VM is gone (vmmd could not while our mounts were in it)."""
    try:
        os.rmdir(share_root)
    except OSError:
        pass
