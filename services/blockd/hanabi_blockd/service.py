"""blockd's domain: a root volume (and a binds disk) per sandbox, shared bases, collection.

A provisioning picks, in order: passthrough of the rootfs's own block device (passthrough.py),
else a layer over the shared base of the rootfs's image (identity.py, layered.py or the
devicemapper backend). devices.json is the only record of what a sandbox holds: blockd keeps
nothing in memory that a restart would need, and at start-up it removes what no record
claims (a crash mid-provisioning) and gives back passthrough devices of unfinished records.
`volume.release` only moves devices.json into blockd's release queue (hanabi_common.releasing):
the unmounting and file removal happen in the background, or at blockd's next start.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from hanabi_blockd import passthrough, shares
from hanabi_blockd.contract import BLOCKD
from hanabi_blockd.detect import choose_backend, probe_host
from hanabi_blockd.gc import choose_evictions
from hanabi_blockd.identity import identify
from hanabi_blockd.layered import ROOT_SERIAL, LoopFileVolumes
from hanabi_blockd.loopfile import LoopFileBackend, loops_backed_by
from hanabi_blockd.mountinfo import mount_at, read_mountinfo
from hanabi_blockd.state import STATE_NAME, DevicesState, HostMount, ShareRecord
from hanabi_common.config import Config
from hanabi_common.errors import AlreadyExists, FailedPrecondition, HanabiError, InvalidArgument, NotFound
from hanabi_common.locks import KeyedLocks
from hanabi_common.metrics import Gauges, LabelledGauge
from hanabi_common import disowned
from hanabi_common.models.base import Drain, Drained, NoArgs, Removed, SandboxRef
from hanabi_common.models.blockd import (BackendInfo, BaseInfo, BlockListing, Collected, CollectBases,
                                         ProvisionVolume, VolumeInfo, VolumeList)
from hanabi_common.releasing import Releases
from hanabi_common.rpc.server import RpcServer
from hanabi_common.state import StateStore

if TYPE_CHECKING:
    from hanabi_blockd.devicemapper import DeviceMapperVolumes

log = logging.getLogger("hanabi.blockd")
SWEEP_INTERVAL_S = 1.0
BINDS_SERIAL = "hanabi-binds"


class BlockService:
    """Owns the block volumes of this host."""

    def __init__(self, config: Config) -> None:
        self.store = StateStore(config.sandboxes_dir)
        self.shares_dir = config.shares_dir
        self.budget_bytes = config.block.bases_budget_mib << 20
        self.backend_name, self.reason = choose_backend(config.block.backend, probe_host())
        self.files = LoopFileBackend(config.block.volume_dir, config.block.headroom_mib,
                                     config.block.max_volume_mib)
        self.volumes: LoopFileVolumes | DeviceMapperVolumes = LoopFileVolumes(self.files)
        if self.backend_name == "devicemapper":
            from hanabi_blockd.devicemapper import DeviceMapperVolumes
            try:
                self.volumes = DeviceMapperVolumes(config.block, self.files)
            except HanabiError as exc:
                if config.block.backend == "devicemapper":
                    raise
                log.error("the thin pool cannot be set up, using the loop-file backend",
                          extra={"error": exc.message})
                self.backend_name, self.reason = "loopfile", f"thin pool set-up failed: {exc.message}"
        self.backend = self.files  # what older callers and tests reach for
        log.info("block backend chosen", extra={"backend": self.backend_name, "reason": self.reason})
        self.locks = KeyedLocks(timeout=None)  # a provisioning waits as long as its caller does
        self._guard = threading.Lock()
        self._gc_lock = threading.Lock()
        self._pending: Counter[str] = Counter()  # base keys of provisionings in flight
        self.releases = Releases(config.run_dir, "blockd", self._finish_release, log)
        self.releases.finish_all()  # what a crash left between a release and its cleanup
        self._recover()
        # Containers deleted while blockd was down: their volumes go now.
        disowned.reconcile(self.store, STATE_NAME, lambda sid: self.release(SandboxRef(sandbox_id=sid)), log)
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="blockd-kept-sweeper", daemon=True)
        self._sweeper.start()
        self.releases.start()

    def _sweep_loop(self) -> None:
        """Drop kept root layers soon after Docker removed their containers."""
        sweep = getattr(self.volumes, "sweep_kept", None)
        while sweep is not None and not self._stop.wait(SWEEP_INTERVAL_S):
            try:
                sweep()
            except Exception:  # noqa: BLE001 - the sweeper must go on
                log.exception("sweep of kept layers failed")

    def _states(self) -> dict[str, DevicesState]:
        states = {}
        for sid in self.store.list_sandboxes(having=STATE_NAME):
            state = self.store.read(sid, STATE_NAME, DevicesState)
            if state is not None:
                states[sid] = state
        return states

    def _released(self) -> list[DevicesState]:
        """The records of released sandboxes whose cleanup is still pending (they still
        hold their files, mounts and bases until the worker is done)."""
        states = []
        for sid in self.releases.pending():
            try:
                states.append(DevicesState.model_validate_json(self.releases.record_path(sid).read_bytes()))
            except (OSError, ValueError):
                continue
        return states

    def _recover(self) -> None:
        """Finish what a crash interrupted, then drop whatever no devices.json claims."""
        for sid, state in self._states().items():
            if not state.complete:
                log.warning("rolling back an unfinished provisioning", extra={"sandbox": sid})
                try:
                    self._undo(state)
                    self.store.remove(sid, STATE_NAME)
                except HanabiError as exc:
                    log.error("rollback failed", extra={"sandbox": sid, "error": exc.message})
        holding = list(self._states().values()) + self._released()
        claimed = {Path(v.path) for s in holding for v in s.volumes}
        for leftover in self.volumes.recover(claimed):
            log.warning("removed a leftover volume file", extra={"path": str(leftover)})
        shared = {str(shares.container_dir(Path(r.share_root), r.container_id) / name)
                  for s in holding for r in s.shares for name in r.names}
        for point in shares.remove_unclaimed(self.shares_dir, shared):
            log.warning("removed a share mount no sandbox claims", extra={"path": point})

    def register(self, server: RpcServer) -> None:
        """Serve volume.*, block.* and backend.info (the table in hanabi_blockd.contract)."""
        BLOCKD.register(server, self)

    def close(self) -> None:
        """Stop the sweeper; the volumes stay with their sandboxes."""
        self._stop.set()
        self._sweeper.join(timeout=5)
        self.releases.close()

    # -- provisioning ----------------------------------------------------------------

    def provision(self, request: ProvisionVolume) -> VolumeInfo:
        """Give the sandbox a root volume for its rootfs directory (and a binds disk)."""
        sid = request.sandbox_id
        rootfs = Path(request.rootfs)
        if not rootfs.exists():
            raise InvalidArgument(f"rootfs {rootfs} does not exist")
        if not rootfs.is_dir():
            raise InvalidArgument(f"rootfs {rootfs} is not a directory")
        with self.locks.hold(sid):
            self.releases.finish(sid)  # an earlier sandbox of this id: its files bear the id
            if self.store.read(sid, STATE_NAME, DevicesState) is not None:
                raise AlreadyExists(f"sandbox {sid} already has a volume")
            state = DevicesState(volumes=[])
            key = None
            try:
                entries = read_mountinfo()
                info = self._try_passthrough(sid, rootfs, entries, state)
                if request.share_root is not None:
                    info = self._share(request, state, info)
                elif info is None:
                    ident = identify(rootfs, entries)
                    key = ident.key
                    with self._guard:
                        self._pending[key] += 1
                    info = self.volumes.root_volume(sid, rootfs, ident, request.formats, self._make_room)
                state.volumes.append(info)
                if request.binds and request.share_root is None:
                    binds_path, binds_size = self.files.build_binds(
                        sid, [(b.name, Path(b.source)) for b in request.binds])
                    binds = VolumeInfo(sandbox_id=sid, backend=self.files.name, path=str(binds_path),
                                       format="raw", fstype="ext4", size_bytes=binds_size,
                                       serial=BINDS_SERIAL, source=", ".join(b.source for b in request.binds)[:4096])
                    state.volumes.append(binds)
                    info = info.model_copy(update={"binds": binds})
                state.complete = True
                self.store.write(sid, STATE_NAME, state)
            except BaseException:
                try:
                    self._undo(state)
                finally:
                    self.store.remove(sid, STATE_NAME)
                raise
            finally:
                if key is not None:
                    with self._guard:
                        self._pending[key] -= 1
        self._collect_quietly()
        log.info("provisioned", extra={"sandbox": sid, "path": info.path, "layout": info.layout,
                                       "detail": info.detail})
        return info

    def _try_passthrough(self, sid: str, rootfs: Path, entries, state: DevicesState) -> VolumeInfo | None:
        plan, why = passthrough.decide(os.path.realpath(rootfs), entries, passthrough.device_numbers)
        if plan is None:
            if not why.startswith("the rootfs is not a mount point"):
                log.info("no passthrough, copying the rootfs", extra={"sandbox": sid, "reason": why})
            return None
        # Record the intent first: a crash after the unmount leaves a record to give it back.
        state.host_mount = HostMount(**plan.__dict__)
        state.complete = False
        self.store.write(sid, STATE_NAME, state)
        refusal = passthrough.take(plan)
        if refusal is not None:
            state.host_mount = None
            self.store.remove(sid, STATE_NAME)
            log.warning("no passthrough, copying the rootfs", extra={"sandbox": sid, "reason": refusal})
            return None
        size = _device_bytes(plan.major, plan.minor)
        return VolumeInfo(sandbox_id=sid, backend="passthrough", path=plan.device, format="raw",
                          fstype=plan.fstype, size_bytes=size, serial=ROOT_SERIAL, source=str(rootfs),
                          layout="passthrough", detail=f"{plan.device} taken from {plan.mount_point}")

    def _share(self, request: ProvisionVolume, state: DevicesState, root: VolumeInfo | None) -> VolumeInfo:
        """Bind the rootfs directory (unless `root` passed its device through) and the binds
        into the VM's export root; recorded before the first mount."""
        cid = request.container_id or request.sandbox_id
        assert request.share_root is not None  # provision() calls this only with a share root
        entries = [] if root is not None else [shares.ShareEntry(shares.ROOTFS_NAME, Path(request.rootfs))]
        entries += [shares.ShareEntry(b.name, Path(b.source), b.readonly) for b in request.binds]
        state.shares.append(ShareRecord(share_root=request.share_root, container_id=cid,
                                        names=[e.name for e in entries]))
        complete, state.complete = state.complete, False
        self.store.write(request.sandbox_id, STATE_NAME, state)
        shares.attach(Path(request.share_root), cid, entries)
        state.complete = complete
        if root is not None:
            return root.model_copy(update={"share": cid})
        return VolumeInfo(sandbox_id=request.sandbox_id, backend="share",
                          path=str(shares.container_dir(Path(request.share_root), cid) / shares.ROOTFS_NAME),
                          format="dir", fstype="9p", size_bytes=0, serial="", source=request.rootfs,
                          layout="share", share=cid, detail=f"live in the VM's share {request.share_root}")

    def _undo(self, state: DevicesState) -> None:
        """Remove a sandbox's files and give its passthrough device back (for release and
        for a failed or interrupted provisioning)."""
        busy = []
        for record in state.shares:
            busy += shares.detach(Path(record.share_root), record.container_id, record.names)
            shares.remove_root_if_empty(Path(record.share_root))
        if busy:
            raise FailedPrecondition(f"shared paths still in use: {', '.join(busy)}")
        for volume in state.volumes:
            if volume.layout in ("passthrough", "share"):
                continue
            loops = loops_backed_by(Path(volume.path)) if Path(volume.path).exists() else []
            if loops:
                raise FailedPrecondition(f"volume {volume.path} is still attached to {', '.join(loops)} "
                                         "(mounted on the host?): unmount and detach it, then delete again")
        mount = state.host_mount
        if mount is not None:
            current = mount_at(mount.mount_point, read_mountinfo())
            if current is None or (current.major, current.minor) != (mount.major, mount.minor):
                passthrough.give_back(passthrough.Passthrough(**mount.model_dump()))
        for volume in state.volumes:
            if volume.layout in ("passthrough", "share"):
                continue
            if volume.serial == ROOT_SERIAL:
                self.volumes.remove_volume(volume)
            else:
                self.files.remove(Path(volume.path))

    def release(self, request: SandboxRef) -> Removed:
        """Release the sandbox's volumes (idempotent): devices.json moves into the release
        queue at once; unmounting and removing the files (`_finish_release`) follow in the
        background. Its base stays for reuse."""
        sid = request.sandbox_id
        with self.locks.hold(sid):
            record = self.releases.take(self.store.path(sid, STATE_NAME), sid)
            self.store.remove_dir_if_empty(sid)
        if record is None:
            return Removed(existed=self.releases.record_path(sid).exists())
        self.releases.wake()
        return Removed(existed=True)

    def _finish_release(self, sid: str, record: Path) -> None:
        """Unmount and remove what a released sandbox's record names (the queue's worker)."""
        self._undo(DevicesState.model_validate_json(record.read_bytes()))
        record.unlink()  # before collecting: its base is free now
        self._collect_quietly()
        log.info("released", extra={"sandbox": sid})

    def drain(self, request: Drain) -> Drained:
        """Wait until the released volumes are all removed (or the timeout passed)."""
        return Drained(pending=self.releases.drain(request.timeout_s))

    # -- collection of bases ---------------------------------------------------------

    def holders(self) -> dict[str, list[str]]:
        """Base key -> the sandboxes whose devices.json names it."""
        held: dict[str, list[str]] = {}
        for sid, state in self._states().items():
            for volume in state.volumes:
                if volume.base_key:
                    held.setdefault(volume.base_key, []).append(sid)
        for state in self._released():  # until the worker removed its layer
            for volume in state.volumes:
                if volume.base_key:
                    held.setdefault(volume.base_key, []).append(volume.sandbox_id)
        return held

    def _collect(self, budget_bytes: int) -> list[str]:
        with self._gc_lock:
            with self._guard:
                kept: set[str] = getattr(self.volumes, "held_bases", lambda: set())()
            in_use = set(self.holders()) | {k for k, n in self._pending.items() if n > 0} | kept
            removed = []
            for key in choose_evictions(self.volumes.base_usage(), in_use, budget_bytes):
                # A provisioning may have picked the base since: it counts as pending before
                # it takes the base's lock, and the veto is asked under that lock.
                if self.volumes.remove_base(key, unless=partial(self._pending_for, key)):
                    removed.append(key)
                    log.info("collected an unused base", extra={"key": key})
            return removed

    def _pending_for(self, key: str) -> bool:
        with self._guard:
            return self._pending[key] > 0

    def _collect_quietly(self) -> None:
        try:
            self._collect(self.budget_bytes)
        except (OSError, HanabiError) as exc:
            log.warning("collecting bases failed", extra={"error": str(exc)})

    def _make_room(self) -> list[str]:
        """Collect every unused base (a build ran out of space)."""
        return self._collect(0)

    def collect(self, request: CollectBases) -> Collected:
        """Collect unused bases beyond the budget now."""
        budget = self.budget_bytes if request.budget_mib is None else request.budget_mib << 20
        return Collected(removed=self._collect(budget))

    # -- queries -----------------------------------------------------------------------

    def get(self, request: SandboxRef) -> VolumeInfo:
        """The root volume of one sandbox."""
        state = self.store.read(request.sandbox_id, STATE_NAME, DevicesState)
        if state is None or not state.volumes:
            raise NotFound(f"sandbox {request.sandbox_id} has no volume")
        return state.volumes[0]

    def list(self, _: NoArgs) -> VolumeList:
        """Every volume, with the sandbox holding it."""
        return VolumeList(volumes=[v for s in self._states().values() for v in s.volumes])

    def listing(self, _: NoArgs) -> BlockListing:
        """Pools, bases with their holders, volumes."""
        held = self.holders()
        usage = {u.key: u.bytes for u in self.volumes.base_usage()}
        bases = [BaseInfo(key=m.key, kind=m.kind, detail=m.detail, path=self.volumes.base_path(m.key),
                          source=m.source, size_bytes=m.size_bytes, allocated_bytes=usage.get(m.key, 0),
                          created_at=m.created_at, last_used=m.last_used, holders=held.get(m.key, []))
                 for m in self.volumes.bases()]
        return BlockListing(backend=self.backend_name, reason=self.reason,
                            pools=self.volumes.pools(self.budget_bytes), bases=bases,
                            volumes=self.list(NoArgs()).volumes)

    def metrics(self) -> Gauges:
        """Gauges for Prometheus: volumes, bases, and each pool's space."""
        listing = self.listing(NoArgs())
        return {
            "hanabi_block_volumes": ("Volumes attached to sandboxes", len(listing.volumes)),
            "hanabi_block_bases": ("Shared base volumes kept for reuse", len(listing.bases)),
            "hanabi_block_kept_layers": ("Root layers of stopped Docker containers, kept for their next start",
                                         len(self.volumes.kept.all()) if hasattr(self.volumes, "kept") else 0),
            "hanabi_block_bases_bytes": ("Bytes the base volumes take on disk",
                                         sum(b.allocated_bytes for b in listing.bases)),
            "hanabi_block_pool_free_bytes": ("Free bytes where volumes are made, per pool",
                                             LabelledGauge("pool", {p.name: p.free_bytes for p in listing.pools})),
            "hanabi_block_pool_healthy": ("1 when the pool is healthy, per pool",
                                          LabelledGauge("pool", {p.name: int(p.healthy) for p in listing.pools})),
        }

    def info(self, _: NoArgs) -> BackendInfo:
        """The backend in use and why."""
        return BackendInfo(backend=self.backend_name, reason=self.reason, volume_dir=str(self.files.volume_dir))


def _device_bytes(major: int, minor: int) -> int:
    try:
        return int(Path(f"/sys/dev/block/{major}:{minor}/size").read_text()) * 512
    except (OSError, ValueError):
        return 0
