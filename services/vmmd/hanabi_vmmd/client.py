"""Typed client of vmmd, used by the runtime, agentd and `hanabi-vmmd ctl`."""

from __future__ import annotations

from collections.abc import Sequence

from hanabi_common.config import Config
from hanabi_common.models.base import Drain, Drained, NoArgs, Removed, SandboxRef
from hanabi_common.models.vmmd import (AttachDisk, AttachNic, BackendChoice, ChooseBackend, CreateVm, DetachDisk,
                                       DetachNic, DiskInfo, StopVm, VmInfo, VmList, VmNic)
from hanabi_common.rpc.client import RpcClient
from hanabi_common.rpc.contract import ContractClient

from hanabi_vmmd.contract import VMMD


class VmmdClient(ContractClient):
    """Calls vmmd (one method per entry of its table, hanabi_vmmd.contract). Every method
    raises the typed hanabi errors (NotFound, ...)."""

    contract = VMMD

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
        return self.call(VMMD.create, request, timeout=wait)

    def backend(self, hypervisor: str | None = None) -> BackendChoice:
        """The backend a VM asked for with `hypervisor` gets (vmmd resolves `auto`), its
        disk formats and share device."""
        return self.call(VMMD.backend, ChooseBackend(hypervisor=hypervisor))

    def pool(self) -> VmList:
        """The warm pool's VMs ready to be taken."""
        return self.call(VMMD.pool, NoArgs())

    def attach_nic(self, sandbox_id: str, nic: VmNic) -> VmInfo:
        """Hot-plug a NIC (QEMU)."""
        return self.call(VMMD.attach_nic, AttachNic(sandbox_id=sandbox_id, nic=nic))

    def detach_nic(self, sandbox_id: str, tap: str, netns_path: str | None) -> Removed:
        """Hot-unplug the NIC on `tap` (idempotent)."""
        return self.call(VMMD.detach_nic, DetachNic(sandbox_id=sandbox_id, tap=tap, netns_path=netns_path))

    def get(self, sandbox_id: str) -> VmInfo:
        """The VM of one sandbox (NotFound if none)."""
        return self.call(VMMD.get, SandboxRef(sandbox_id=sandbox_id))

    def list(self) -> VmList:
        """Every VM vmmd owns."""
        return self.call(VMMD.list, NoArgs())

    def stop(self, sandbox_id: str, timeout_s: float | None = None) -> Removed:
        """Stop a VM and forget it (idempotent)."""
        grace = timeout_s or self.config.vmm.stop_timeout_s
        return self.call(VMMD.stop, StopVm(sandbox_id=sandbox_id, timeout_s=timeout_s),
                         timeout=max(self.rpc.timeout, grace + 15))

    def release(self, sandbox_id: str) -> Removed:
        """A container's delete: SIGKILL the VMM now, its cleanup follows in the background."""
        return self.call(VMMD.release, SandboxRef(sandbox_id=sandbox_id))

    def drain(self, timeout_s: float = 30.0) -> Drained:
        """Wait until the released VMs are all cleaned up; the ones still pending."""
        return self.call(VMMD.drain, Drain(timeout_s=timeout_s), timeout=timeout_s + 5)

    def attach_disk(self, sandbox_id: str, path: str, serial: str, format: str = "raw",
                    readonly: bool = False) -> DiskInfo:
        """Hot-plug a disk image or block device."""
        request = AttachDisk(sandbox_id=sandbox_id, path=path, serial=serial, format=format,
                             readonly=readonly)
        return self.call(VMMD.attach_disk, request)

    def detach_disk(self, sandbox_id: str, device_id: str) -> Removed:
        """Hot-unplug a disk (idempotent)."""
        return self.call(VMMD.detach_disk, DetachDisk(sandbox_id=sandbox_id, device_id=device_id))

    def pause(self, sandbox_id: str) -> VmInfo:
        """Stop the VM's vCPUs."""
        return self.call(VMMD.pause, SandboxRef(sandbox_id=sandbox_id))

    def resume(self, sandbox_id: str) -> VmInfo:
        """Restart the VM's vCPUs."""
        return self.call(VMMD.resume, SandboxRef(sandbox_id=sandbox_id))
