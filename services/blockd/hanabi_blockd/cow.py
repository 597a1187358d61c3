"""A container's own copy-on-write layer over a shared base image.

* `qcow2` (QEMU): `qemu-img create -f qcow2 -F raw -b BASE LAYER SIZE`. The layer starts at
  a few hundred KiB whatever the image size; QEMU opens the base read-only (shared lock) and
  writes only into the layer, so any number of VMs share one base. O(1) in image size.
* `raw` (Firecracker takes raw files only): `cp --reflink=auto --sparse=always BASE LAYER`.
  On a filesystem with reflinks (XFS with reflink=1, btrfs, bcachefs) the copy shares every
  extent with the base and costs O(1) space and little time. Where reflinks are missing
  (ext4, as on this machine) cp falls back to a real copy of the base's *allocated* blocks:
  O(image) bytes written and time per container. The per-image work (walking the rootfs,
  mke2fs) is still done once per image, and the copy is sequential I/O, but the promise of
  "a second container costs nothing" holds for Firecracker only on a reflink filesystem or
  with the devicemapper backend (thin snapshots). blockd logs which one it got. (Another
  route, not taken: export the qcow2 layer as a block device with `qemu-nbd --connect`; it
  needs the nbd module, missing here, and a host process per container.)

Both build to `<layer>.partial` and rename, like every other volume file.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from hanabi_common.errors import FailedPrecondition, Internal

PARTIAL = ".partial"


def _run(argv: list[str], what: str, timeout: float = 600) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise FailedPrecondition(f"{argv[0]} not found: {what}") from None
    if done.returncode != 0:
        err = done.stderr.strip()[-500:]
        if "No space left" in err:
            raise FailedPrecondition(f"{argv[0]}: no space left for the container's layer: {err}")
        raise Internal(f"{argv[0]} failed ({done.returncode}): {err}")


def make_layer(base: Path, layer: Path, size_bytes: int, fmt: str) -> None:
    """Make `layer` (format `qcow2` or `raw`) over the read-only `base` of `size_bytes`."""
    if not base.is_file():
        raise FailedPrecondition(f"base volume {base} vanished before the layer was made")
    partial = layer.with_name(layer.name + PARTIAL)
    partial.unlink(missing_ok=True)
    try:
        if fmt == "qcow2":
            _run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base),
                  str(partial), str(size_bytes)], "install qemu-utils")
        elif fmt == "raw":
            _run(["cp", "--reflink=auto", "--sparse=always", str(base), str(partial)],
                 "install coreutils")
            os.chmod(partial, 0o600)
        else:
            raise ValueError(f"unknown layer format {fmt!r}")
        os.replace(partial, layer)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def backing_file(layer: Path) -> str | None:
    """The backing file a qcow2 layer names (read from its header; None for raw or none)."""
    with open(layer, "rb") as handle:
        header = handle.read(32)
        if header[:4] != b"QFI\xfb":
            return None
        offset = int.from_bytes(header[8:16], "big")
        length = int.from_bytes(header[16:20], "big")
        if not offset or not length or length > 4096:
            return None
        handle.seek(offset)
        return handle.read(length).decode("utf-8", "surrogateescape")
