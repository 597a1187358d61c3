"""The virtio-blk serial a Firecracker guest reads for a drive (pure core, one stat).

Firecracker answers the guest's VIRTIO_BLK_T_GET_ID with an id derived from the backing
file, the way kvmtool does: the decimal st_dev, st_rdev and st_ino of the open file,
concatenated and cut to VIRTIO_BLK_ID_BYTES (20). It recomputes it when `PATCH /drives`
swaps the file, so the guest's /sys/block/vdX/serial names whatever is attached now; the
agent finds a container's disk by this serial, as it finds QEMU disks by theirs.
"""

from __future__ import annotations

import os
from pathlib import Path

VIRTIO_BLK_ID_BYTES = 20


def device_id(st_dev: int, st_rdev: int, st_ino: int) -> str:
    """Firecracker's drive id for a file with these stat fields (pure)."""
    return f"{st_dev}{st_rdev}{st_ino}"[:VIRTIO_BLK_ID_BYTES]


def guest_serial(path: str | os.PathLike) -> str:
    """The serial the guest will read for a drive backed by `path` (follows symlinks, as
    Firecracker's open does)."""
    st = os.stat(Path(path))
    return device_id(st.st_dev, st.st_rdev, st.st_ino)
