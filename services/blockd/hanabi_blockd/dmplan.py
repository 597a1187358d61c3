"""The devicemapper backend's plans, pure: tables, names, ids, messages, crash clean-up.

A thin pool (`dmsetup create POOL --table "0 DATA_SECTORS thin-pool META DATA BLOCK LWM 1
skip_block_zeroing"`) holds one thin volume per image (the base: `create_thin ID`, made
ext4 from the rootfs once, then never written) and one thin snapshot per container
(`create_snap ID BASE_ID`: O(1), sharing every block with the base until written). Thin ids
are allocated here and recorded in the pool record *before* the kernel is told (`pending`),
so a crash between the two leaves an id that the clean-up plan deletes (deleting an id the
pool never created fails harmlessly). Nothing in this module runs a command.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from pydantic import BaseModel

SECTOR = 512
MAX_DM_NAME = 127


class ThinRecord(BaseModel):
    """One thin device of the pool."""

    dev_id: int
    size_bytes: int
    name: str
    base_key: str | None = None  # for a snapshot: the base it was taken of


class PoolRecord(BaseModel):
    """What blockd knows of its pool (`<dm_dir>/pool.json`)."""

    schema_version: int = 1
    next_id: int = 1
    pending: list[int] = []
    bases: dict[str, ThinRecord] = {}
    volumes: dict[str, ThinRecord] = {}


def pool_table(data_bytes: int, metadata_dev: str, data_dev: str, block_size_kib: int,
               low_water_mark_blocks: int | None = None) -> str:
    """The thin-pool table line; the low-water mark defaults to 1% of the data blocks."""
    if block_size_kib % 64 or not 64 <= block_size_kib <= 1 << 20:
        raise ValueError("the pool block size must be a multiple of 64 KiB, 64 KiB to 1 GiB")
    block_sectors = block_size_kib * 1024 // SECTOR
    sectors = data_bytes // SECTOR // block_sectors * block_sectors
    if sectors <= 0:
        raise ValueError("the data device is smaller than one pool block")
    blocks = sectors // block_sectors
    lwm = low_water_mark_blocks if low_water_mark_blocks is not None else max(1, blocks // 100)
    return f"0 {sectors} thin-pool {metadata_dev} {data_dev} {block_sectors} {lwm} 1 skip_block_zeroing"


def thin_table(size_bytes: int, pool_dev: str, dev_id: int) -> str:
    """The table of one thin device (base or snapshot) of `size_bytes`."""
    return f"0 {-(-size_bytes // SECTOR)} thin {pool_dev} {dev_id}"


def device_name(pool: str, kind: str, ident: str) -> str:
    """The dm name of a base (`kind`=base) or a container's snapshot (`snap`) of `pool`:
    `<pool>-<kind>-<ident>`, so that two pools on one host never touch each other's
    devices; ids too long or odd for a dm name are hashed."""
    name = f"{pool}-{kind}-{ident}"
    if len(name) > MAX_DM_NAME or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
        name = f"{pool}-{kind}-{hashlib.sha256(ident.encode()).hexdigest()[:40]}"
    return name


def message(verb: str, *ids: int) -> str:
    """A pool message: create_thin ID, create_snap ID ORIGIN, delete ID."""
    arity = {"create_thin": 1, "create_snap": 2, "delete": 1}
    if arity.get(verb) != len(ids) or any(i < 0 or i >= 1 << 24 for i in ids):
        raise ValueError(f"bad pool message {verb} {ids}")
    return " ".join([verb, *map(str, ids)])


def allocate(record: PoolRecord) -> tuple[int, PoolRecord]:
    """A fresh thin id, recorded as pending in the returned record."""
    taken = {r.dev_id for r in [*record.bases.values(), *record.volumes.values()]} | set(record.pending)
    dev_id = record.next_id
    while dev_id in taken:
        dev_id += 1
    if dev_id >= 1 << 24:
        raise ValueError("the pool has no thin ids left")
    return dev_id, record.model_copy(update={"next_id": dev_id + 1, "pending": [*record.pending, dev_id]})


@dataclass(frozen=True)
class CleanupPlan:
    """What to do after a crash: dm devices to remove, thin ids to delete, records to drop."""

    remove_devices: list[str] = field(default_factory=list)
    delete_ids: list[int] = field(default_factory=list)
    forget_volumes: list[str] = field(default_factory=list)


def cleanup_plan(record: PoolRecord, active: list[str], live_sandboxes: set[str],
                 pool_name: str) -> CleanupPlan:
    """The clean-up after a restart: snapshots of sandboxes without devices.json, pending
    ids, and active dm devices of this pool (`<pool>-base-*`, `<pool>-snap-*`) that no live
    sandbox holds (bases are kept deactivated). Other devices are never touched."""
    forget = sorted(sid for sid in record.volumes if sid not in live_sandboxes)
    keep_active = {record.volumes[sid].name for sid in record.volumes if sid in live_sandboxes}
    ours = (f"{pool_name}-base-", f"{pool_name}-snap-")
    remove = sorted(n for n in active if n.startswith(ours) and n not in keep_active)
    delete = sorted(set(record.pending) | {record.volumes[sid].dev_id for sid in forget})
    return CleanupPlan(remove_devices=remove, delete_ids=delete, forget_volumes=forget)


@dataclass(frozen=True)
class PoolStatus:
    """A thin-pool's `dmsetup status` line, read."""

    used_data_blocks: int
    total_data_blocks: int
    used_meta_blocks: int
    total_meta_blocks: int
    mode: str
    needs_check: bool

    @property
    def healthy(self) -> bool:
        """Writable, not out of space, no check needed."""
        return self.mode == "rw" and not self.needs_check


def parse_pool_status(line: str) -> PoolStatus:
    """Read `0 LEN thin-pool TRANS USEDMETA/TOTALMETA USEDDATA/TOTALDATA ROOT MODE ...`."""
    parts = line.split()
    if len(parts) < 8 or parts[2] != "thin-pool":
        raise ValueError(f"not a thin-pool status: {line!r}")
    if parts[3] == "Fail":
        return PoolStatus(0, 0, 0, 0, "fail", True)
    used_meta, total_meta = map(int, parts[4].split("/"))
    used_data, total_data = map(int, parts[5].split("/"))
    return PoolStatus(used_data, total_data, used_meta, total_meta, parts[7], "needs_check" in parts[8:])


def loop_files(dm_dir: str, data_gib: int, metadata_mib: int) -> list[tuple[str, int]]:
    """The sparse backing files of a loop-backed pool: (path, bytes), data first."""
    return [(f"{dm_dir}/data", data_gib << 30), (f"{dm_dir}/metadata", metadata_mib << 20)]


LOOP_WARNING = ("the devicemapper thin pool runs on loop-mounted sparse files under {dir} "
                "(like Docker's loop-lvm): fine for testing, slow and fragile in production; "
                "set block.dm_data_device and block.dm_metadata_device to real block devices")
