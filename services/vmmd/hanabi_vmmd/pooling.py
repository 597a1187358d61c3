"""vmmd's side of the warm pool (`VmService.pooling`): boot pooled VMs, hand one to a
sandbox, drop the dead ones. The bookkeeping of which are free is `pool.WarmPool`'s.
`Pooling` is given what it uses of the service (`PoolAccess`), nothing else.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from hanabi_common.errors import FailedPrecondition
from hanabi_common.models.base import NoArgs
from hanabi_common.models.vmmd import VmList
from hanabi_common.config import Config
from hanabi_common.locks import KeyedLocks
from hanabi_common.state import StateStore
from hanabi_vmmd.agent_probe import wait_agent_ready
from hanabi_vmmd.devices import Devices
from hanabi_vmmd.hypervisor import Hypervisor, NicSpec, VmHandle
from hanabi_vmmd.pool import WarmPool
from hanabi_vmmd.reaper import Reaper
from hanabi_vmmd.state import STATE_NAME, HypervisorState

log = logging.getLogger("hanabi.vmmd")


def pool_backend(backends: Mapping[str, Hypervisor]) -> Hypervisor | None:
    """The backend the warm pool boots with: the first whose capabilities say it pools (a
    pooled VM gets its NICs by hot-plug later; Firecracker takes NICs at boot only)."""
    return next((b for b in backends.values() if b.capabilities().pooling), None)


class PoolAccess(Protocol):
    """What the warm pool uses of vmmd's service."""

    config: Config
    store: StateStore
    pool_store: StateStore
    locks: KeyedLocks
    backends: dict[str, Hypervisor]
    reaper: Reaper
    devices: Devices
    _handles: dict[str, VmHandle]

    def _backend(self, name: str) -> Hypervisor: ...

    def _write(self, state: HypervisorState, store: StateStore | None = None) -> None: ...

    def _remove_vm_dirs(self, state: HypervisorState) -> None: ...

    def _clone_or_boot(self, sid: str, store: StateStore, backend: Hypervisor, memory_mib: int, vcpus: int,
                       nics: tuple[NicSpec, ...] = (), cgroups: Sequence[Path] = ()) -> HypervisorState: ...


class Pooling:
    """Pooled VMs: booted by the pool's thread, claimed by vm.create, listed by vm.pool."""

    pool: WarmPool  # set by the service once the pool exists (it calls _boot_pooled)

    def __init__(self, vms: PoolAccess) -> None:
        self.config, self.store, self.pool_store, self.locks = vms.config, vms.store, vms.pool_store, vms.locks
        self.backends, self.reaper, self._handles = vms.backends, vms.reaper, vms._handles
        self._backend: Callable[[str], Hypervisor] = vms._backend
        self._write: Callable[..., None] = vms._write
        self._remove_vm_dirs: Callable[[HypervisorState], None] = vms._remove_vm_dirs
        self._clone_or_boot: Callable[..., HypervisorState] = vms._clone_or_boot
        self._plug_nic = vms.devices.plug_nic

    def _boot_pooled(self, pool_id: str) -> None:
        """The pool's boot: a VM of the default size, no NICs, recorded in the pool's store,
        ready once its guest agent answers (a VM that does not get there is removed)."""
        with self.locks.hold(pool_id):
            backend = pool_backend(self.backends)
            if backend is None:
                raise FailedPrecondition("no backend of this vmmd can keep a warm pool")
            state = self._clone_or_boot(pool_id, self.pool_store, backend,
                                        self.config.vmm.memory_mib, self.config.vmm.vcpus)
        try:
            seconds = wait_agent_ready(Path(state.agent_socket), self.config.vmm.boot_timeout_s)
        except BaseException:
            with self.locks.hold(pool_id):
                self._discard_pooled(pool_id, state)
            raise
        log.info("pooled vm booted", extra={"pool_id": pool_id, "agent_ready_s": round(seconds, 2)})

    def _is_pooled(self, sid: str) -> bool:
        """Whether `sid` names a VM of the warm pool (recorded in the pool's store; a
        container may well be called pool-something)."""
        return self.pool_store.path(sid, STATE_NAME).exists()

    def _pooled_after_restart(self) -> list[str]:
        """Pooled VMs a restart re-adopted (dead ones are removed)."""
        alive = []
        for pool_id in self.pool_store.list_sandboxes(having=STATE_NAME):
            state = self.pool_store.read(pool_id, STATE_NAME, HypervisorState)
            if state is not None and state.state == "running" and pool_id in self._handles:
                alive.append(pool_id)
            else:
                self._discard_pooled(pool_id, state)
        return alive

    def _discard_pooled(self, pool_id: str, state: HypervisorState | None) -> None:
        """Stop (if needed) and remove a pooled VM that cannot be handed out."""
        self.reaper.unwatch(pool_id)
        if state is not None:
            backend = self.backends.get(state.hypervisor)
            handle = self._handles.get(pool_id) or state.handle()
            if backend is not None and backend.is_alive(handle):
                backend.stop(handle, self.config.vmm.stop_timeout_s)
            self._remove_vm_dirs(state)
        self._handles.pop(pool_id, None)
        self.pool_store.purge(pool_id)

    def _claim_pooled(self, sid: str, nics: tuple[NicSpec, ...]) -> HypervisorState | None:
        """Hand a free pooled VM to sandbox `sid` and hot-plug its NICs; None when the pool
        has none (or the one taken turned out dead). Caller holds sid's lock."""
        pool_id = self.pool.take()
        if pool_id is None:
            return None
        began = time.monotonic()
        with self.locks.hold(pool_id):
            state = self.pool_store.read(pool_id, STATE_NAME, HypervisorState)
            backend = self._backend(state.hypervisor) if state is not None else None
            handle = self._handles.get(pool_id) or (state.handle() if state is not None else None)
            if state is None or backend is None or handle is None or not backend.is_alive(handle):
                self._discard_pooled(pool_id, state)
                return None
            self.reaper.unwatch(pool_id)
            state.sandbox_id = sid
            self._write(state)                  # the sandbox's record first: a crash now keeps it
            self.pool_store.purge(pool_id)
            self._handles.pop(pool_id, None)
            handle.sandbox_id = sid
            self._handles[sid] = handle
            self.reaper.watch(handle)
        try:
            for nic in nics:
                self._plug_nic(state, backend, handle, nic)
        except BaseException:
            self.reaper.unwatch(sid)
            backend.stop(handle, self.config.vmm.stop_timeout_s)
            self.store.remove(sid, STATE_NAME)
            self._remove_vm_dirs(state)
            self._handles.pop(sid, None)
            raise
        log.info("vm taken from the warm pool", extra={"sandbox": sid, "pool_id": pool_id, "pid": state.pid,
                                                       "ms": round((time.monotonic() - began) * 1000, 1)})
        return state

    def pooled(self, _: NoArgs | None = None) -> VmList:
        """The warm pool's VMs that are ready to be taken."""
        vms = []
        for pool_id in self.pool.free():
            state = self.pool_store.read(pool_id, STATE_NAME, HypervisorState)
            if state is not None:
                vms.append(state.info())
        return VmList(vms=vms)
