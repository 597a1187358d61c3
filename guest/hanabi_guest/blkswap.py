"""Disks that arrive in a Firecracker placeholder drive: wait until the guest sees all of it.

Firecracker has no block hotplug: a VM boots with placeholder drives (ph0.., 1 MiB empty
files) and vmmd points one at a container's volume with ``PATCH /drives/phN``. The agent
finds that disk the way it finds a QEMU disk, by its virtio-blk serial: Firecracker answers
GET_ID with the backing file's ``st_dev st_rdev st_ino`` (recomputed by the swap), the host
computes the same string and passes it as the rootfs serial (see docs/agent-protocol.md).

The serial changes at once, but the new size reaches the guest through a config-change
interrupt that the kernel handles asynchronously, and pages read from the placeholder
(the partition scan reads the first page at boot) may still sit in the device's page cache.
So before mounting: drop the device's cached pages (BLKFLSBUF), read the ext4 superblock,
and go on only once ``/sys/block/<name>/size`` covers the whole filesystem. A disk that is
not ext4 is taken as it is (the mount says what is wrong).

STDLIB ONLY: runs inside the guest.
"""

from __future__ import annotations

import os
import stat
import struct

BLKFLSBUF = 0x1261  # _IO(0x12, 97): sync and invalidate a block device's buffers
SECTOR = 512
SUPERBLOCK_OFFSET = 1024
EXT4_MAGIC = 0xEF53
INCOMPAT_64BIT = 0x80
HEAD_BYTES = SUPERBLOCK_OFFSET + 1024


def ext4_bytes(head: bytes) -> int | None:
    """The size in bytes of the ext2/3/4 filesystem whose first 2 KiB are `head` (pure);
    None when there is no such superblock."""
    if len(head) < HEAD_BYTES:
        return None
    sb = head[SUPERBLOCK_OFFSET:SUPERBLOCK_OFFSET + 1024]
    if struct.unpack_from("<H", sb, 0x38)[0] != EXT4_MAGIC:
        return None
    blocks = struct.unpack_from("<I", sb, 0x04)[0]
    log_block = struct.unpack_from("<I", sb, 0x18)[0]
    if log_block > 6:  # 64 KiB blocks at most
        return None
    if struct.unpack_from("<I", sb, 0x60)[0] & INCOMPAT_64BIT:
        blocks |= struct.unpack_from("<I", sb, 0x150)[0] << 32
    return blocks * (1024 << log_block)


def device_bytes(name: str, sysfs: str = "/sys") -> int | None:
    """The size the kernel gives block device `name` now, in bytes (None if unknown)."""
    try:
        with open(os.path.join(sysfs, "block", name, "size")) as handle:
            return int(handle.read().strip()) * SECTOR
    except (OSError, ValueError):
        return None


def drop_cached_pages(node: str) -> None:
    """BLKFLSBUF on a block device node (nothing for other files)."""
    import fcntl

    fd = os.open(node, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if stat.S_ISBLK(os.fstat(fd).st_mode):
            fcntl.ioctl(fd, BLKFLSBUF, 0)
    finally:
        os.close(fd)


def read_head(node: str) -> bytes:
    """The first HEAD_BYTES of a device (fewer if it is smaller)."""
    with open(node, "rb", buffering=0) as handle:
        return handle.read(HEAD_BYTES)


def settled(name: str, node: str, sysfs: str = "/sys") -> bool:
    """True once device `name` (node `node`) shows its whole filesystem; False while the
    guest still sees a placeholder's size (call again later)."""
    try:
        drop_cached_pages(node)
        need = ext4_bytes(read_head(node))
    except OSError:
        return False
    if need is None:
        return True
    have = device_bytes(name, sysfs)
    return have is not None and have >= need
