"""vmmd's hot-plug operations: disks and NICs into a running VM (`VmService.devices`).

Each holds the sandbox's lock, asks the backend for a free slot (a PCIe root port on
QEMU, a placeholder drive on Firecracker), and records what is attached in
`hypervisor.json`, so a restarted vmmd can still detach it. `Devices` is given what it
uses of the service (`VmAccess`: the sandbox locks, reading and writing the state, the
backend and handle of a VM), nothing else.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from collections.abc import Callable
from typing import Protocol

from hanabi_common.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from hanabi_common.locks import KeyedLocks
from hanabi_common.models.base import Removed
from hanabi_common.models.vmmd import AttachDisk, AttachNic, DetachDisk, DetachNic, DiskInfo, VmInfo, VmNic
from hanabi_vmmd.hypervisor import DiskSpec, Hypervisor, NicSpec, VmHandle
from hanabi_common.state import StateStore
from hanabi_vmmd.state import DiskRecord, HypervisorState, NicRecord

log = logging.getLogger("hanabi.vmmd")
DETACH_TIMEOUT_S = 15.0


def nic_spec(device_id: str, nic: VmNic) -> NicSpec:
    """The backend's view of a requested NIC (MACs kept lower-case, as the guest reports them)."""
    return NicSpec(device_id=device_id, tap=nic.tap, mac=nic.mac.lower(), mtu=nic.mtu, netns_path=nic.netns_path)


class VmAccess(Protocol):
    """What the hot-plug operations use of vmmd's service."""

    locks: KeyedLocks

    def _read(self, sandbox_id: str) -> HypervisorState: ...

    def _write(self, state: HypervisorState, store: StateStore | None = None) -> None: ...

    def _handle(self, state: HypervisorState) -> VmHandle: ...

    def _backend(self, name: str) -> Hypervisor: ...

    def _running(self, sandbox_id: str, *allowed: str) -> tuple[HypervisorState, Hypervisor, VmHandle]: ...


class Devices:
    """vm.attach_disk, vm.detach_disk, vm.attach_nic, vm.detach_nic."""

    def __init__(self, vms: VmAccess) -> None:
        self.locks = vms.locks
        self._read: Callable[[str], HypervisorState] = vms._read
        self._write: Callable[..., None] = vms._write
        self._handle: Callable[[HypervisorState], VmHandle] = vms._handle
        self._backend: Callable[[str], Hypervisor] = vms._backend
        self._running: Callable[..., tuple[HypervisorState, Hypervisor, VmHandle]] = vms._running

    def attach_disk(self, request: AttachDisk) -> DiskInfo:
        """Hot-plug a raw/qcow2 image or a block device; the guest sees it by serial."""
        path = Path(request.path)
        if not path.is_absolute():
            raise InvalidArgument(f"disk path {request.path!r} must be absolute")
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            raise InvalidArgument(f"disk path {path}: {exc.strerror}") from None
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise InvalidArgument(f"disk path {path} is neither a regular file nor a block device")
        sid = request.sandbox_id
        with self.locks.hold(sid):
            state, backend, handle = self._running(sid, "running")
            if any(d.serial == request.serial for d in state.disks):
                raise AlreadyExists(f"VM of sandbox {sid} already has a disk with serial {request.serial}")
            disk = DiskSpec(device_id=f"disk-{request.serial}", node_name=f"blk-{request.serial}",
                            path=path, serial=request.serial, format=request.format,
                            readonly=request.readonly)
            # Firecracker's guest reads a serial derived from the file, not the requested one.
            guest_serial = (backend.guest_serial(handle, disk)
                            if backend.capabilities().guest_serial_from_path else "")
            if guest_serial and any(d.guest_serial == guest_serial for d in state.disks):
                raise AlreadyExists(f"VM of sandbox {sid} already has a disk the guest sees as {guest_serial}")
            bus = backend.attach_disk(handle, disk, state.busy_slots())
            state.disks.append(DiskRecord(device_id=disk.device_id, node_name=disk.node_name,
                                          serial=disk.serial, path=str(path), format=disk.format,
                                          readonly=disk.readonly, bus=bus, guest_serial=guest_serial))
            self._write(state)
        log.info("disk attached", extra={"sandbox": sid, "device": disk.device_id, "bus": bus})
        return DiskInfo(device_id=disk.device_id, serial=disk.serial, path=str(path),
                        guest_serial=guest_serial or disk.serial)

    def detach_disk(self, request: DetachDisk) -> Removed:
        """Hot-unplug a disk (idempotent); waits for the guest to let go of it."""
        sid = request.sandbox_id
        with self.locks.hold(sid):
            state = self._read(sid)
            record = state.disk(request.device_id)
            if record is None:
                return Removed(existed=False)
            backend = self._backend(state.hypervisor)
            handle = self._handle(state)
            if backend.is_alive(handle):
                if state.state == "paused":
                    raise FailedPrecondition(f"VM of sandbox {sid} is paused: resume it to detach a disk")
                backend.detach_disk(handle, record.spec(), DETACH_TIMEOUT_S)
            state.disks = [d for d in state.disks if d.device_id != request.device_id]
            self._write(state)
        log.info("disk detached", extra={"sandbox": sid, "device": request.device_id})
        return Removed(existed=True)

    # -- NICs --------------------------------------------------------------------------

    def attach_nic(self, request: AttachNic) -> VmInfo:
        """Hot-plug a NIC backed by a tap netd made (backends without NIC hotplug refuse)."""
        sid, nic = request.sandbox_id, request.nic
        with self.locks.hold(sid):
            state, backend, handle = self._running(sid, "running")
            if any(n.tap == nic.tap and n.netns_path == nic.netns_path for n in state.nics):
                raise AlreadyExists(f"VM of sandbox {sid} already has a NIC on tap {nic.tap}")
            used = {n.device_id for n in state.nics}
            device_id = next(f"nic{i}" for i in range(len(used) + 1) if f"nic{i}" not in used)
            bus = self.plug_nic(state, backend, handle, nic_spec(device_id, nic))
        log.info("nic attached", extra={"sandbox": sid, "device": device_id, "bus": bus, "tap": nic.tap})
        return state.info()

    def plug_nic(self, state: HypervisorState, backend: Hypervisor, handle: VmHandle, spec: NicSpec) -> str:
        """Hot-plug `spec` on a free slot and record it in hypervisor.json; the slot."""
        bus = backend.attach_nic(handle, spec, state.busy_slots())
        state.nics.append(NicRecord.of(spec, bus))
        self._write(state)
        return bus

    def detach_nic(self, request: DetachNic) -> Removed:
        """Hot-unplug the NIC on a tap (idempotent); waits for the guest to let go of it."""
        sid = request.sandbox_id
        with self.locks.hold(sid):
            state = self._read(sid)
            record = next((n for n in state.nics if n.tap == request.tap and n.netns_path == request.netns_path),
                          None)
            if record is None:
                return Removed(existed=False)
            backend = self._backend(state.hypervisor)
            handle = self._handle(state)
            if backend.is_alive(handle):
                backend.detach_nic(handle, record.spec(), DETACH_TIMEOUT_S)
            state.nics = [n for n in state.nics if n is not record]
            self._write(state)
        log.info("nic detached", extra={"sandbox": sid, "device": record.device_id, "tap": request.tap})
        return Removed(existed=True)
