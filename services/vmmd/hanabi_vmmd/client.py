"""Typed client of vmmd, used by the runtime, agentd and `hanabi-vmmd ctl`."""

from __future__ import annotations

from collections.abc import Sequence

from hanabi_common.config import Config
from hanabi_common.models.base import Removed, SandboxRef
from hanabi_common.models.vmmd import (AttachDisk, AttachNic, CreateVm, DetachDisk, DetachNic, DiskInfo,
                                       StopVm, VmInfo, VmList, VmNic)
from hanabi_common.rpc.client import RpcClient


class VmmdClient:
    """Calls vmmd. Every method raises the typed hanabi errors (NotFound, ...)."""

    def __init__(self, config: Config, timeout: float | None = None) -> None:
        self.config = config
        self.rpc = RpcClient("vmmd", config.endpoint("vmmd"), timeout=timeout or config.rpc.default_timeout_s)

    def create(self, sandbox_id: str, memory_mib: int | None = None, vcpus: int | None = None,
               hypervisor: str | None = None, timeout: float | None = None,
               nics: Sequence[VmNic] = (), cgroup_dirs: Sequence[str] = ()) -> VmInfo:
        """Boot a VM for a sandbox (with NICs on netd's taps); returns once the VMM answers
        (not the guest agent)."""
        request = CreateVm(sandbox_id=sandbox_id, memory_mib=memory_mib, vcpus=vcpus,
                           hypervisor=hypervisor, nics=list(nics),
                           cgroup_dirs=list(cgroup_dirs))
        wait = timeout or max(self.rpc.timeout, self.config.vmm.boot_timeout_s + 5)
        return self.rpc.call("vm.create", request, VmInfo, timeout=wait)

    def pool(self) -> VmList:
        """The warm pool's VMs ready to be taken."""
        return self.rpc.call("vm.pool", {}, VmList, idempotent=True)

    def attach_nic(self, sandbox_id: str, nic: VmNic) -> VmInfo:
        """Hot-plug a NIC (QEMU)."""
        return self.rpc.call("vm.attach_nic", AttachNic(sandbox_id=sandbox_id, nic=nic), VmInfo)

    def detach_nic(self, sandbox_id: str, tap: str, netns_path: str | None) -> Removed:
        """Hot-unplug the NIC on `tap` (idempotent)."""
        return self.rpc.call("vm.detach_nic", DetachNic(sandbox_id=sandbox_id, tap=tap, netns_path=netns_path),
                             Removed, idempotent=True)

    def get(self, sandbox_id: str) -> VmInfo:
        """The VM of one sandbox (NotFound if none)."""
        return self.rpc.call("vm.get", SandboxRef(sandbox_id=sandbox_id), VmInfo, idempotent=True)

    def list(self) -> VmList:
        """Every VM vmmd owns."""
        return self.rpc.call("vm.list", {}, VmList, idempotent=True)

    def stop(self, sandbox_id: str, timeout_s: float | None = None) -> Removed:
        """Stop a VM and forget it (idempotent)."""
        grace = timeout_s or self.config.vmm.stop_timeout_s
        return self.rpc.call("vm.stop", StopVm(sandbox_id=sandbox_id, timeout_s=timeout_s), Removed,
                             timeout=max(self.rpc.timeout, grace + 15), idempotent=True)

    def attach_disk(self, sandbox_id: str, path: str, serial: str, format: str = "raw",
                    readonly: bool = False) -> DiskInfo:
        """Hot-plug a disk image or block device."""
        request = AttachDisk(sandbox_id=sandbox_id, path=path, serial=serial, format=format,
                             readonly=readonly)
        return self.rpc.call("vm.attach_disk", request, DiskInfo)

    def detach_disk(self, sandbox_id: str, device_id: str) -> Removed:
        """Hot-unplug a disk (idempotent)."""
        return self.rpc.call("vm.detach_disk", DetachDisk(sandbox_id=sandbox_id, device_id=device_id),
                             Removed, idempotent=True)

    def pause(self, sandbox_id: str) -> VmInfo:
        """Stop the VM's vCPUs."""
        return self.rpc.call("vm.pause", SandboxRef(sandbox_id=sandbox_id), VmInfo, idempotent=True)

    def resume(self, sandbox_id: str) -> VmInfo:
        """Restart the VM's vCPUs."""
        return self.rpc.call("vm.resume", SandboxRef(sandbox_id=sandbox_id), VmInfo, idempotent=True)
