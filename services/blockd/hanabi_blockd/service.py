"""blockd's domain: a volume per sandbox, made from the bundle's rootfs, removed on release."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from hanabi_blockd.detect import choose_backend, probe_host
from hanabi_blockd.loopfile import LoopFileBackend
from hanabi_blockd.state import STATE_NAME, DevicesState
from hanabi_common.config import Config
from hanabi_common.errors import AlreadyExists, NotFound
from hanabi_common.models.base import NoArgs, Removed, SandboxRef
from hanabi_common.models.blockd import BackendInfo, ProvisionVolume, VolumeInfo, VolumeList
from hanabi_common.rpc.server import RpcServer
from hanabi_common.state import StateStore

log = logging.getLogger("hanabi.blockd")
ROOT_SERIAL = "hanabi-root"
BINDS_SERIAL = "hanabi-binds"


class BlockService:
    """Owns the block volumes of this host."""

    def __init__(self, config: Config) -> None:
        self.store = StateStore(config.sandboxes_dir)
        self.backend_name, self.reason = choose_backend(config.block.backend, probe_host())
        self.backend = LoopFileBackend(config.block.volume_dir, config.block.headroom_mib,
                                       config.block.max_volume_mib)
        log.info("block backend chosen", extra={"backend": self.backend_name, "reason": self.reason})
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._recover()

    def _lock(self, sandbox_id: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(sandbox_id, threading.Lock())

    def _recover(self) -> None:
        """Drop half-built images and images no devices.json claims (a crash mid-provision)."""
        for leftover in self.backend.clean_partials():
            log.warning("removed a half-built volume", extra={"path": str(leftover)})
        claimed = {Path(v.path) for sid in self.store.list_sandboxes(having=STATE_NAME)
                   for v in (self.store.read(sid, STATE_NAME, DevicesState) or DevicesState(volumes=[])).volumes}
        if self.backend.volume_dir.is_dir():
            for image in self.backend.volume_dir.glob("*.ext4"):  # roots and binds alike
                if image not in claimed:
                    image.unlink(missing_ok=True)
                    log.warning("removed an unclaimed volume", extra={"path": str(image)})

    def register(self, server: RpcServer) -> None:
        """Serve volume.* and backend.info."""
        server.register("volume.provision", ProvisionVolume, self.provision)
        server.register("volume.release", SandboxRef, self.release)
        server.register("volume.get", SandboxRef, self.get)
        server.register("volume.list", NoArgs, self.list)
        server.register("backend.info", NoArgs, self.info)

    def close(self) -> None:
        """Nothing held in memory."""

    def provision(self, request: ProvisionVolume) -> VolumeInfo:
        """Build the sandbox's root volume from its rootfs directory."""
        with self._lock(request.sandbox_id):
            if self.store.read(request.sandbox_id, STATE_NAME, DevicesState) is not None:
                raise AlreadyExists(f"sandbox {request.sandbox_id} already has a volume")
            rootfs = Path(request.rootfs)
            made: list[Path] = []
            try:
                path, size = self.backend.build(request.sandbox_id, rootfs)
                made.append(path)
                info = VolumeInfo(sandbox_id=request.sandbox_id, backend=self.backend_name,
                                  path=str(path), format="raw", fstype="ext4", size_bytes=size,
                                  serial=ROOT_SERIAL, source=str(rootfs))
                volumes = [info]
                if request.binds:
                    binds_path, binds_size = self.backend.build_binds(
                        request.sandbox_id, [(b.name, Path(b.source)) for b in request.binds])
                    made.append(binds_path)
                    binds = VolumeInfo(sandbox_id=request.sandbox_id, backend=self.backend_name,
                                       path=str(binds_path), format="raw", fstype="ext4",
                                       size_bytes=binds_size, serial=BINDS_SERIAL,
                                       source=", ".join(b.source for b in request.binds)[:4096])
                    volumes.append(binds)
                    info = info.model_copy(update={"binds": binds})
                self.store.write(request.sandbox_id, STATE_NAME, DevicesState(volumes=volumes))
            except BaseException:
                for leftover in made:
                    self.backend.remove(leftover)
                raise
        log.info("provisioned", extra={"sandbox": request.sandbox_id, "path": str(path), "bytes": size})
        return info

    def release(self, request: SandboxRef) -> Removed:
        """Remove the sandbox's volumes (idempotent)."""
        with self._lock(request.sandbox_id):
            state = self.store.read(request.sandbox_id, STATE_NAME, DevicesState)
            if state is None:
                return Removed(existed=False)
            for volume in state.volumes:
                self.backend.remove(Path(volume.path))
            self.store.remove(request.sandbox_id, STATE_NAME)
        with self._guard:
            self._locks.pop(request.sandbox_id, None)
        log.info("released", extra={"sandbox": request.sandbox_id})
        return Removed(existed=True)

    def get(self, request: SandboxRef) -> VolumeInfo:
        """The root volume of one sandbox."""
        state = self.store.read(request.sandbox_id, STATE_NAME, DevicesState)
        if state is None or not state.volumes:
            raise NotFound(f"sandbox {request.sandbox_id} has no volume")
        return state.volumes[0]

    def list(self, _: NoArgs) -> VolumeList:
        """Every volume, with the sandbox holding it."""
        volumes = []
        for sid in self.store.list_sandboxes(having=STATE_NAME):
            state = self.store.read(sid, STATE_NAME, DevicesState)
            if state is not None:
                volumes.extend(state.volumes)
        return VolumeList(volumes=volumes)

    def info(self, _: NoArgs) -> BackendInfo:
        """The backend in use and why."""
        return BackendInfo(backend=self.backend_name, reason=self.reason, volume_dir=str(self.backend.volume_dir))
