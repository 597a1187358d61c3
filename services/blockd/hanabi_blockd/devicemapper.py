"""The devicemapper backend's I/O: a thin pool, a base thin volume per image, a thin snapshot
per container (plans in dmplan.py). Chosen where `dmsetup targets` lists thin-pool.

The pool sits on the block devices named in the config, or else on two sparse files under
`block.dm_dir` attached to loop devices (Docker's loop-lvm; a warning is logged). The pool
record (`<dm_dir>/pool.json`, written atomically before every kernel change) is the source
of truth for thin ids; at start-up the clean-up plan removes what a crash left.
A snapshot is a block device: QEMU and Firecracker both take it as a raw disk.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import threading
import time
from pathlib import Path
from collections.abc import Callable, Sequence

from hanabi_blockd import dmplan
from hanabi_blockd.bases import BaseMeta
from hanabi_blockd.gc import BaseUsage
from hanabi_blockd.identity import Identity
from hanabi_blockd.layered import ROOT_SERIAL
from hanabi_blockd.loopfile import LoopFileBackend, measure_tree
from hanabi_blockd.sizing import image_size_bytes, inode_count_for
from hanabi_common.config import BlockConfig
from hanabi_common.errors import FailedPrecondition, Internal, InvalidArgument
from hanabi_common.models.blockd import PoolInfo, VolumeInfo
from hanabi_common.state import atomic_write_bytes

log = logging.getLogger("hanabi.blockd.devicemapper")
MAPPER_DIR = Path("/dev/mapper")  # where dmsetup makes the device nodes


def _run(argv: list[str], timeout: float = 120) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise FailedPrecondition(f"{argv[0]} not found (install dmsetup / e2fsprogs / util-linux)") from None
    if done.returncode != 0:
        raise Internal(f"{' '.join(argv[:3])} failed ({done.returncode}): {done.stderr.strip()[-400:]}")
    return done.stdout


class DeviceMapperVolumes:
    """Root volumes as thin snapshots of per-image thin volumes."""

    name = "devicemapper"

    def __init__(self, config: BlockConfig, files: LoopFileBackend) -> None:
        self.config = config
        self.files = files
        self.dir = Path(config.dm_dir)
        self.pool = config.dm_pool_name
        self.pool_dev = str(MAPPER_DIR / self.pool)
        self._lock = threading.RLock()
        self._ensure_pool()

    # -- the record --------------------------------------------------------------------

    def _read(self) -> dmplan.PoolRecord:
        try:
            return dmplan.PoolRecord.model_validate_json((self.dir / "pool.json").read_bytes())
        except FileNotFoundError:
            return dmplan.PoolRecord()

    def _write(self, record: dmplan.PoolRecord) -> None:
        atomic_write_bytes(self.dir / "pool.json", record.model_dump_json(indent=1).encode())

    def _message(self, text: str) -> None:
        _run(["dmsetup", "message", self.pool, "0", text])

    # -- the pool ----------------------------------------------------------------------

    def _ensure_pool(self) -> None:
        if Path(self.pool_dev).exists():
            return
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        attached: list[str] = []
        try:
            if self.config.dm_data_device and self.config.dm_metadata_device:
                data, meta = str(self.config.dm_data_device), str(self.config.dm_metadata_device)
            else:
                log.warning(dmplan.LOOP_WARNING.format(dir=self.dir))
                for path, size in dmplan.loop_files(str(self.dir), self.config.dm_data_size_gib,
                                                    self.config.dm_metadata_size_mib):
                    if not Path(path).exists():
                        with open(path, "wb") as handle:
                            handle.truncate(size)
                    attached.append(_run(["losetup", "--find", "--show", path]).strip())
                data, meta = attached
            data_bytes = int(_run(["blockdev", "--getsize64", data]).strip())
            if not self._read().bases and not self._read().volumes:  # a new pool: blank metadata
                _run(["dd", "if=/dev/zero", f"of={meta}", "bs=4096", "count=1", "conv=notrunc"])
            table = dmplan.pool_table(data_bytes, meta, data, self.config.dm_block_size_kib)
            _run(["dmsetup", "create", self.pool, "--table", table])
        except BaseException:
            for loop in attached:  # no loop device outlives a pool that did not come up
                subprocess.run(["losetup", "-d", loop], capture_output=True)
            raise

    @contextlib.contextmanager
    def _undo_on_failure(self, dev_id: int, name: str):
        """On failure: deactivate `name`, delete thin id `dev_id`, drop it from pending
        (best effort: what stays pending is deleted at the next start)."""
        try:
            yield
        except BaseException:
            if (MAPPER_DIR / name).exists():
                subprocess.run(["dmsetup", "remove", name], capture_output=True)
            done = subprocess.run(["dmsetup", "message", self.pool, "0", dmplan.message("delete", dev_id)],
                                  capture_output=True)
            if done.returncode == 0:
                record = self._read()
                if dev_id in record.pending:
                    record.pending.remove(dev_id)
                    self._write(record)
            raise

    def _thin(self, name: str, size: int, dev_id: int) -> str:
        _run(["dmsetup", "create", name, "--table", dmplan.thin_table(size, self.pool_dev, dev_id)])
        return str(MAPPER_DIR / name)

    # -- volumes -----------------------------------------------------------------------

    def root_volume(self, sandbox_id: str, rootfs: Path, identity: Identity,
                    formats: Sequence[str], make_room: Callable[[], list[str]]) -> VolumeInfo:
        """A thin snapshot of the image's base volume (built first if missing)."""
        with self._lock:
            record = self._read()
            base = record.bases.get(identity.key)
            built = base is None
            if base is None:
                base = self._build_base(rootfs, identity)
                record = self._read()
            dev_id, record = dmplan.allocate(record)
            self._write(record)
            name = dmplan.device_name(self.pool, "snap", sandbox_id)
            with self._undo_on_failure(dev_id, name):
                self._message(dmplan.message("create_snap", dev_id, base.dev_id))
                path = self._thin(name, base.size_bytes, dev_id)
            record.pending.remove(dev_id)
            record.volumes[sandbox_id] = dmplan.ThinRecord(dev_id=dev_id, size_bytes=base.size_bytes,
                                                           name=name, base_key=identity.key)
            self._write(record)
            if not built:
                self._touch(identity.key)
        return VolumeInfo(sandbox_id=sandbox_id, backend=self.name, path=path, format="raw",
                          fstype="ext4", size_bytes=base.size_bytes, serial=ROOT_SERIAL,
                          source=str(rootfs), layout="layer", base_key=identity.key,
                          base_path=dmplan.device_name(self.pool, "base", identity.key),
                          detail=f"{identity.kind}: {identity.detail}; base {'built' if built else 'reused'}")

    def _build_base(self, rootfs: Path, identity: Identity) -> dmplan.ThinRecord:
        if not rootfs.is_dir():
            raise InvalidArgument(f"rootfs {rootfs} is not a directory")
        content, entries = measure_tree(rootfs)
        size = image_size_bytes(content, entries, self.files.headroom_mib)
        pool = self.pools(0)[0]
        if not pool.healthy:
            raise FailedPrecondition(f"thin pool {self.pool} is not usable: {pool.detail}")
        if content + (16 << 20) > pool.free_bytes:
            raise FailedPrecondition(f"thin pool {self.pool} is full: {pool.free_bytes >> 20} MiB free, "
                                     f"the image needs about {content >> 20} MiB")
        dev_id, record = dmplan.allocate(self._read())
        self._write(record)
        name = dmplan.device_name(self.pool, "base", identity.key)
        with self._undo_on_failure(dev_id, name):
            self._message(dmplan.message("create_thin", dev_id))
            path = self._thin(name, size, dev_id)
            self.files._mkfs(Path(path), rootfs, inode_count_for(entries))
            _run(["dmsetup", "remove", name])  # a base stays inactive: never written again
        now = time.time()
        base = dmplan.ThinRecord(dev_id=dev_id, size_bytes=size, name=name)
        record = self._read()
        record.pending.remove(dev_id)
        record.bases[identity.key] = base
        self._write(record)
        self._meta(identity, rootfs, size, now)
        return base

    def _meta(self, identity: Identity, rootfs: Path, size: int, now: float) -> None:
        meta = BaseMeta(key=identity.key, kind=identity.kind, detail=identity.detail,
                        source=str(rootfs), size_bytes=size, created_at=now, last_used=now)
        atomic_write_bytes(self.dir / f"{identity.key}.json", meta.model_dump_json().encode())

    def _touch(self, key: str) -> None:
        path = self.dir / f"{key}.json"
        try:
            meta = BaseMeta.model_validate_json(path.read_bytes())
        except (FileNotFoundError, ValueError):
            return
        atomic_write_bytes(path, meta.model_copy(update={"last_used": time.time()}).model_dump_json().encode())

    def remove_volume(self, volume: VolumeInfo) -> bool:
        """Deactivate and delete a container's snapshot."""
        with self._lock:
            record = self._read()
            thin = record.volumes.pop(volume.sandbox_id, None)
            if thin is None:
                return False
            if (MAPPER_DIR / thin.name).exists():
                _run(["dmsetup", "remove", thin.name])
            record.pending.append(thin.dev_id)
            self._write(record)
            self._message(dmplan.message("delete", thin.dev_id))
            record.pending.remove(thin.dev_id)
            self._write(record)
        return True

    def bases(self) -> list[BaseMeta]:
        """Every base the pool holds."""
        found = []
        for key, thin in self._read().bases.items():
            try:
                found.append(BaseMeta.model_validate_json((self.dir / f"{key}.json").read_bytes()))
            except (FileNotFoundError, ValueError):
                found.append(BaseMeta(key=key, kind="?", detail="", source="", size_bytes=thin.size_bytes,
                                      created_at=0, last_used=0))
        return found

    def base_path(self, key: str) -> str:
        """The (inactive) dm name of a base."""
        return dmplan.device_name(self.pool, "base", key)

    def base_usage(self) -> list[BaseUsage]:
        """Bases by size (thin volumes: the virtual size bounds what they use)."""
        return [BaseUsage(key=m.key, bytes=m.size_bytes, last_used=m.last_used) for m in self.bases()]

    def remove_base(self, key: str, unless: Callable[[], bool] | None = None) -> bool:
        """Delete one base's thin volume unless `unless()` says it is in use now."""
        with self._lock:
            if unless is not None and unless():
                return False
            record = self._read()
            thin = record.bases.pop(key, None)
            if thin is None:
                return False
            record.pending.append(thin.dev_id)
            self._write(record)
            self._message(dmplan.message("delete", thin.dev_id))
            record.pending.remove(thin.dev_id)
            self._write(record)
            (self.dir / f"{key}.json").unlink(missing_ok=True)
        return True

    def pools(self, budget_bytes: int) -> list[PoolInfo]:
        """The thin pool's usage and health."""
        try:
            status = dmplan.parse_pool_status(_run(["dmsetup", "status", self.pool]).strip())
            block = self.config.dm_block_size_kib * 1024
            return [PoolInfo(name=self.pool, backend=self.name, path=self.pool_dev,
                             total_bytes=status.total_data_blocks * block,
                             free_bytes=(status.total_data_blocks - status.used_data_blocks) * block,
                             bases_bytes=sum(u.bytes for u in self.base_usage()),
                             bases_budget_bytes=budget_bytes, healthy=status.healthy,
                             detail=f"mode {status.mode}, metadata {status.used_meta_blocks}/{status.total_meta_blocks}")]
        except (Internal, ValueError) as exc:
            return [PoolInfo(name=self.pool, backend=self.name, path=self.pool_dev, total_bytes=0,
                             free_bytes=0, bases_bytes=0, bases_budget_bytes=budget_bytes,
                             healthy=False, detail=str(exc))]

    def recover(self, claimed: set[Path]) -> list[Path]:
        """Carry out the clean-up plan; then the loop-file leftovers (binds disks)."""
        with self._lock:
            record = self._read()
            live = {sid for sid, t in record.volumes.items() if (MAPPER_DIR / t.name) in claimed}
            active = [line.split()[0] for line in _run(["dmsetup", "ls"]).splitlines() if line.strip()]
            plan = dmplan.cleanup_plan(record, active, live, self.pool)
            for name in plan.remove_devices:
                _run(["dmsetup", "remove", name])
            for dev_id in plan.delete_ids:
                try:
                    self._message(dmplan.message("delete", dev_id))
                except Internal:
                    pass  # an id the pool never created
            for sid in plan.forget_volumes:
                record.volumes.pop(sid, None)
            record.pending = []
            self._write(record)
        removed = self.files.clean_partials() + [(MAPPER_DIR / n) for n in plan.remove_devices]
        for leftover in self.files.volume_dir.glob("*.ext4") if self.files.volume_dir.is_dir() else []:
            if leftover not in claimed:  # binds disks no devices.json claims
                leftover.unlink(missing_ok=True)
                removed.append(leftover)
        return removed
