"""The export root of a VM's file share: an empty directory vmmd makes before the VMM starts
and removes after it ended.

QEMU exports it over virtio-9p (its own 9P server, `-fsdev local`); blockd bind-mounts the
container's rootfs and its bind-mount sources into per-container subdirectories of it (see
hanabi_blockd.shares). So vmmd never deletes anything under it: removal is `rmdir` of the
empty root only, and a root that still holds blockd's mounts is left for blockd's release or
reconcile. The roots live in `Config.shares_dir`, never under a VM directory (those are
removed whole).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

log = logging.getLogger("hanabi.vmmd")


def share_dir_for(shares_dir: Path, vm_key: str) -> Path:
    """The export root of the VM booted under `vm_key` (a sandbox id or a pool VM's id):
    short, so QEMU's option syntax and socket path limits never bite."""
    return Path(shares_dir) / hashlib.sha256(vm_key.encode()).hexdigest()[:16]


def make_share_dir(path: Path) -> Path:
    """Create the (empty) export root, mode 0700; a leftover empty one is reused."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def remove_share_dir(path: Path | None) -> bool:
    """rmdir the export root; False (and logged) when blockd's mounts still sit in it."""
    if path is None:
        return True
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError as exc:
        log.info("share root not empty yet, left for blockd", extra={"path": str(path), "error": exc.strerror})
        return False
    return True


def clean_orphan_shares(shares_dir: Path, referenced: set[Path]) -> None:
    """At start: end the 9P servers of every export root no VM record names, and rmdir the
    roots (empty ones only: blockd's reconcile owns the mounts in the others)."""
    from hanabi_vmmd.share_server import stop_servers

    if not Path(shares_dir).is_dir():
        return
    for entry in Path(shares_dir).iterdir():
        if entry in referenced or not entry.is_dir():
            continue
        killed = stop_servers(entry)
        if killed:
            log.warning("ended the 9P servers of an orphaned share", extra={"path": str(entry), "pids": killed})
        if remove_share_dir(entry):
            log.info("removed an orphaned share root", extra={"path": str(entry)})
