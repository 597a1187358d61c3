"""vmmd's RPC contract: every vm.* method, its models and whether a retry is harmless.

Drives `VmmService.register` and `VmmdClient` (hanabi_common.rpc.contract).
"""

from __future__ import annotations

from hanabi_common.models.base import Drain, Drained, NoArgs, Removed, SandboxRef
from hanabi_common.models.vmmd import (AttachDisk, AttachNic, BackendChoice, ChooseBackend, CreateVm, DetachDisk,
                                       DetachNic, DiskInfo, StopVm, VmInfo, VmList)
from hanabi_common.rpc.contract import Contract, Rpc


class VMMD(Contract):
    """vmmd: the VMs of this host."""

    daemon = "vmmd"
    create = Rpc("vm.create", CreateVm, VmInfo)
    get = Rpc("vm.get", SandboxRef, VmInfo, idempotent=True)
    list = Rpc("vm.list", NoArgs, VmList, idempotent=True)
    pool = Rpc("vm.pool", NoArgs, VmList, idempotent=True, handler="pooling.pooled")
    stop = Rpc("vm.stop", StopVm, Removed, idempotent=True)
    release = Rpc("vm.release", SandboxRef, Removed, idempotent=True)
    drain = Rpc("vm.drain", Drain, Drained, idempotent=True)
    attach_disk = Rpc("vm.attach_disk", AttachDisk, DiskInfo, handler="devices.attach_disk")
    detach_disk = Rpc("vm.detach_disk", DetachDisk, Removed, idempotent=True, handler="devices.detach_disk")
    attach_nic = Rpc("vm.attach_nic", AttachNic, VmInfo, handler="devices.attach_nic")
    detach_nic = Rpc("vm.detach_nic", DetachNic, Removed, idempotent=True, handler="devices.detach_nic")
    pause = Rpc("vm.pause", SandboxRef, VmInfo, idempotent=True)
    resume = Rpc("vm.resume", SandboxRef, VmInfo, idempotent=True)
    backend = Rpc("vm.backend", ChooseBackend, BackendChoice, idempotent=True, handler="choose_backend")
