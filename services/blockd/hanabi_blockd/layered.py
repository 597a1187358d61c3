"""Root volumes of the loop-file backend: a shared base per image, a layer per container.

The first container of an image pays for the base (walk the rootfs, `mke2fs -d`, into
`bases/<key>.raw.partial`, renamed when complete); every container then gets its own
copy-on-write layer over it (cow.py: qcow2 for QEMU, a reflink/sparse raw copy for
Firecracker). The guest sees one ext4 disk either way. A base whose file vanished is
rebuilt; a build that runs out of space first collects unused bases, then fails cleanly.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from collections.abc import Callable, Sequence

from hanabi_blockd.bases import BaseMeta, BaseStore, allocated_bytes
from hanabi_blockd.cow import make_layer
from hanabi_blockd.gc import BaseUsage
from hanabi_blockd.identity import Identity
from hanabi_blockd.kept import KeptLayers, anchor_of
from hanabi_blockd.loopfile import LoopFileBackend
from hanabi_common.errors import FailedPrecondition
from hanabi_common.models.blockd import PoolInfo, VolumeInfo

log = logging.getLogger("hanabi.blockd.layered")
ROOT_SERIAL = "hanabi-root"
LAYER_SUFFIXES = (".qcow2", ".raw")


class LoopFileVolumes:
    """Root volumes as layers over shared base files."""

    name = "loopfile"

    def __init__(self, files: LoopFileBackend) -> None:
        self.files = files
        self.store = BaseStore(files.volume_dir / "bases")
        self.kept = KeptLayers(files.volume_dir / "kept")

    def root_volume(self, sandbox_id: str, rootfs: Path, identity: Identity,
                    formats: Sequence[str], make_room: Callable[[], list[str]]) -> VolumeInfo:
        """Make `sandbox_id`'s root layer over the base of `identity` (built if missing)."""
        def build(partial: Path) -> int:
            try:
                return self.files.build_to(rootfs, partial)
            except FailedPrecondition as exc:
                if "space" not in exc.message or not make_room():
                    raise
                partial.unlink(missing_ok=True)
                log.info("collected unused bases to make room, building again")
                return self.files.build_to(rootfs, partial)

        meta, built = self.store.obtain(identity.key, identity.kind, identity.detail, str(rootfs), build)
        base = self.store.path(meta.key)
        fmt = formats[0]
        layer = self.files.layer_path(sandbox_id, fmt)
        taken = self.kept.take(sandbox_id, meta.key, fmt, layer)  # this container's own, from its last run
        if not taken:
            make_layer(base, layer, meta.size_bytes, fmt)
        log.info("root layer made", extra={"sandbox": sandbox_id, "base": meta.key, "built": built,
                                           "kept_layer": taken, "format": fmt, "layer_bytes": allocated_bytes(layer)})
        return VolumeInfo(sandbox_id=sandbox_id, backend=self.name, path=str(layer), format=fmt,
                          fstype="ext4", size_bytes=meta.size_bytes, serial=ROOT_SERIAL,
                          source=str(rootfs), layout="layer" if fmt == "qcow2" else "copy",
                          base_key=meta.key, base_path=str(base),
                          detail=f"{identity.kind}: {identity.detail}; base {'built' if built else 'reused'}"
                                 + ("; layer kept from the last run" if taken else ""))

    def remove_volume(self, volume: VolumeInfo) -> bool:
        """Remove a container's layer (the base stays for the next container); the layer of
        a Docker overlay2 container is kept for its next start instead (see kept.py)."""
        anchor = anchor_of(volume.source)
        path = Path(volume.path)
        if anchor is not None and volume.base_key and volume.layout in ("layer", "copy") and path.exists():
            self.kept.keep(volume.sandbox_id, path, volume.base_key, volume.format, volume.size_bytes, anchor)
            return True
        return self.files.remove(path)

    def sweep_kept(self) -> list[str]:
        """Drop the kept layers whose containers are gone."""
        return self.kept.sweep()

    def held_bases(self) -> set[str]:
        """Bases that kept layers stand on."""
        return self.kept.base_keys()

    def bases(self) -> list[BaseMeta]:
        """Every complete base."""
        return self.store.all()

    def base_path(self, key: str) -> str:
        """Where the base of `key` lives."""
        return str(self.store.path(key))

    def base_usage(self) -> list[BaseUsage]:
        """Bytes and last use of every base, for the collector."""
        return self.store.usage()

    def remove_base(self, key: str, unless: Callable[[], bool] | None = None) -> bool:
        """Remove one base unless `unless()` says, under the base's lock, it is in use now."""
        return self.store.remove(key, unless)

    def pools(self, budget_bytes: int) -> list[PoolInfo]:
        """The volume directory as the one pool of this backend."""
        directory = self.files.volume_dir
        try:
            usage = shutil.disk_usage(directory)
            total, free, healthy, detail = usage.total, usage.free, usage.free > (16 << 20), ""
        except OSError as exc:
            total, free, healthy, detail = 0, 0, False, str(exc)
        if healthy is False and not detail:
            detail = "less than 16 MiB free"
        return [PoolInfo(name="volumes", backend=self.name, path=str(directory), total_bytes=total,
                         free_bytes=free, bases_bytes=sum(u.bytes for u in self.base_usage()),
                         bases_budget_bytes=budget_bytes, healthy=healthy, detail=detail)]

    def recover(self, claimed: set[Path]) -> list[Path]:
        """Remove what a crash left: partial files, bases without record, container layers
        and images that no devices.json claims, kept layers of removed containers."""
        self.kept.sweep()
        removed = self.files.clean_partials() + self.store.clean()
        directory = self.files.volume_dir
        if directory.is_dir():
            for suffix in (".ext4",) + LAYER_SUFFIXES:  # roots, binds disks, layers
                for leftover in directory.glob(f"*{suffix}"):
                    if leftover.is_file() and leftover not in claimed:
                        leftover.unlink(missing_ok=True)
                        removed.append(leftover)
        return removed
