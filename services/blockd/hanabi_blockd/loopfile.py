"""The loop-file backend: ext4 image files (bases, binds disks) and per-container layers.

The image is built without mounting anything on the host (`mke2fs -t ext4 -d DIR`), on a
sparse file, and handed to the VMM as a raw disk file: QEMU opens the file itself, so no
host loop device is needed and none can leak. A build goes to `<name>.partial` first and is
renamed when complete; leftover partial files from a crash are removed at start-up.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
from pathlib import Path

from hanabi_blockd.sizing import image_size_bytes, inode_count_for
from hanabi_common.errors import FailedPrecondition, Internal, InvalidArgument

log = logging.getLogger("hanabi.blockd.loopfile")
PARTIAL_SUFFIX = ".partial"
STAGING_SUFFIX = ".staging"


def copy_bind_source(source: Path, target: Path) -> None:
    """Copy a bind mount's source; sockets, devices and fifos cannot travel to a VM."""
    try:
        mode = source.stat().st_mode
    except FileNotFoundError:
        raise InvalidArgument(f"bind mount source {source} does not exist") from None
    if stat.S_ISDIR(mode):
        shutil.copytree(source, target, symlinks=True, ignore_dangling_symlinks=True,
                        ignore=_special_files)
    elif stat.S_ISREG(mode):
        shutil.copy2(source, target)
    else:
        raise InvalidArgument(f"bind mount source {source} is not a file or a directory "
                              "(sockets, devices and fifos cannot be shared with a VM)")


def _special_files(directory: str, names: list[str]) -> list[str]:
    """Entries copytree must skip: anything neither file, directory nor symlink."""
    skipped = []
    for name in names:
        st = os.lstat(os.path.join(directory, name))
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            skipped.append(name)
    return skipped


def measure_tree(root: Path) -> tuple[int, int]:
    """Bytes of regular-file content and number of entries below `root` (no symlink following)."""
    total, entries = 0, 0
    for dirpath, dirnames, filenames in os.walk(root):
        entries += len(dirnames) + len(filenames)
        for name in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            total += st.st_blocks * 512 if st.st_blocks else st.st_size
    return total, entries


class LoopFileBackend:
    """Builds and removes ext4 image files under one directory."""

    name = "loopfile"

    def __init__(self, volume_dir: Path, headroom_mib: int, max_volume_mib: int) -> None:
        self.volume_dir = Path(volume_dir)
        self.headroom_mib = headroom_mib
        self.max_volume_mib = max_volume_mib

    def clean_partials(self) -> list[Path]:
        """Remove images and staging trees a crash left half-built; return what was removed."""
        if not self.volume_dir.is_dir():
            return []
        removed = []
        for leftover in self.volume_dir.glob(f"*{PARTIAL_SUFFIX}"):  # top level only: bases/ has its own
            leftover.unlink(missing_ok=True)
            removed.append(leftover)
        for staging in self.volume_dir.glob(f"*{STAGING_SUFFIX}"):
            shutil.rmtree(staging, ignore_errors=True)
            removed.append(staging)
        return removed

    def image_path(self, sandbox_id: str, kind: str = "ext4") -> Path:
        """Where a sandbox's image lives (`ext4`: its root; `binds.ext4`: its copied binds)."""
        return self.volume_dir / f"{sandbox_id}.{kind}"

    def build_binds(self, sandbox_id: str, binds: list[tuple[str, Path]]) -> tuple[Path, int]:
        """Copy each bind source (a file or a directory) to `<name>` on a fresh image.

        The guest bind-mounts from this disk: the container sees the host's content as it
        was at create; its writes stay in the copy and are not seen on the host.
        """
        staging = self.volume_dir / f"{sandbox_id}{STAGING_SUFFIX}"
        self.volume_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=0o700)
        try:
            for name, source in binds:
                copy_bind_source(source, staging / name)
            return self.build(sandbox_id, staging, kind="binds.ext4")
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def build(self, sandbox_id: str, rootfs: Path, kind: str = "ext4") -> tuple[Path, int]:
        """Build the image of directory `rootfs` for `sandbox_id`; return its path and size."""
        final = self.image_path(sandbox_id, kind)
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        try:
            size = self.build_to(rootfs, partial)
            os.replace(partial, final)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return final, size

    def build_to(self, rootfs: Path, target: Path) -> int:
        """Write an ext4 image of directory `rootfs` to `target` (a temp name the caller
        renames); return its size. On failure `target` may remain: the caller removes it."""
        if not rootfs.is_dir():
            raise InvalidArgument(f"rootfs {rootfs} is not a directory")
        content, entries = measure_tree(rootfs)
        size = image_size_bytes(content, entries, self.headroom_mib)
        if size > self.max_volume_mib << 20:
            raise FailedPrecondition(f"rootfs {rootfs} needs a {size >> 20} MiB volume, above "
                                     f"the configured maximum of {self.max_volume_mib} MiB")
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        free = shutil.disk_usage(target.parent).free
        if content + (16 << 20) > free:
            raise FailedPrecondition(f"not enough space in {target.parent}: {free >> 20} MiB "
                                     f"free, the rootfs needs about {content >> 20} MiB")
        with open(target, "wb") as handle:
            handle.truncate(size)
        self._mkfs(target, rootfs, inode_count_for(entries))
        return size

    def layer_path(self, sandbox_id: str, fmt: str) -> Path:
        """Where a sandbox's copy-on-write root layer lives (`<sid>.qcow2` or `<sid>.raw`)."""
        return self.volume_dir / f"{sandbox_id}.{fmt}"

    @staticmethod
    def _mkfs(image: Path, rootfs: Path, inodes: int) -> None:
        argv = ["mke2fs", "-q", "-F", "-t", "ext4", "-N", str(inodes), "-L", "rootfs",
                "-E", "lazy_itable_init=1,lazy_journal_init=1", "-O", "^has_journal",
                "-d", str(rootfs), str(image)]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        except FileNotFoundError:
            raise FailedPrecondition("mke2fs not found: install e2fsprogs") from None
        if done.returncode != 0:
            if "No space left" in done.stderr or "Could not allocate" in done.stderr:
                raise FailedPrecondition(f"no space left for the volume {image}: "
                                         f"{done.stderr.strip()[-300:]}")
            raise Internal(f"mke2fs failed ({done.returncode}): {done.stderr.strip()[-500:]}")

    def remove(self, path: Path) -> bool:
        """Remove an image; True if it existed."""
        try:
            Path(path).unlink()
        except FileNotFoundError:
            return False
        return True

    def describe(self) -> str:
        """One line for humans."""
        return f"ext4 image files in {self.volume_dir}"


def loops_backed_by(path: Path, sys_block: Path = Path("/sys/block")) -> list[str]:
    """Loop devices whose backing file is `path` (someone attached, maybe mounted, a volume)."""
    found = []
    target = os.path.realpath(path)
    for backing in sys_block.glob("loop*/loop/backing_file"):
        try:
            name = backing.read_text().strip()
        except OSError:
            continue
        if name.removesuffix(" (deleted)") == target:
            found.append("/dev/" + backing.parent.parent.name)
    return found
