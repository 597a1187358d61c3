"""Messages of vmmd: VM lifecycle and device hotplug."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from hanabi_common.models.base import Reply, Request, SandboxId, SandboxRef
from hanabi_wire.constants import LINK_NAME_REGEX, MAC_REGEX, MAX_MTU, MIN_MTU, SERIAL_REGEX

# What a VM may be given (CreateVm, the [vmm] defaults, each backend's own check, the
# runtime's sizing): the guest image boots in 64 MiB; 1 TiB and 64 vCPUs at most.
MIN_VM_MEMORY_MIB = 64
MAX_VM_MEMORY_MIB = 1 << 20
MAX_VCPUS = 64

VmState = Literal["booting", "running", "paused", "stopped"]
# How agentd reaches the guest agent: a Unix stream socket (QEMU virtio-serial), Firecracker's
# hybrid vsock (the Unix socket plus `CONNECT <agent_port>`), or AF_VSOCK (vhost-vsock).
AgentTransport = Literal["unix", "hybrid_vsock", "vsock"]


class VmNic(Request):
    """A guest NIC backed by a tap device that netd made in a network namespace."""

    tap: str = Field(pattern=LINK_NAME_REGEX)
    mac: str = Field(pattern=MAC_REGEX)
    mtu: int = Field(1500, ge=MIN_MTU, le=MAX_MTU)
    netns_path: str | None = Field(None, min_length=1, max_length=4096)


class CreateVm(Request):
    """Boot a VM for a sandbox (memory and vCPUs default to the config).

    `nics` are attached at boot (Firecracker can take them no other way); a backend that
    hot-plugs (QEMU) also takes them later through vm.attach_nic.
    """

    sandbox_id: SandboxId
    memory_mib: int | None = Field(None, ge=MIN_VM_MEMORY_MIB, le=MAX_VM_MEMORY_MIB)
    vcpus: int | None = Field(None, ge=1, le=MAX_VCPUS)
    hypervisor: Literal["auto", "qemu", "firecracker"] | None = None
    nics: list[VmNic] = Field(default_factory=list, max_length=8)
    # The container's host cgroups (made by the runtime): the VMM joins them as soon as it
    # is spawned, so its guest memory is charged there (`docker stats`).
    cgroup_dirs: list[Annotated[str, Field(pattern=r"^/sys/fs/cgroup/", max_length=4096)]] = Field(
        default_factory=list, max_length=16)


class AttachNic(Request):
    """Hot-plug a NIC into a running VM."""

    sandbox_id: SandboxId
    nic: VmNic


class DetachNic(Request):
    """Hot-unplug the NIC backed by `tap` (in `netns_path`)."""

    sandbox_id: SandboxId
    tap: str = Field(pattern=LINK_NAME_REGEX)
    netns_path: str | None = Field(None, min_length=1, max_length=4096)


class VmInfo(Reply):
    """What vmmd knows of one VM."""

    sandbox_id: str
    hypervisor: str
    accel: str
    pid: int
    state: VmState
    memory_mib: int
    vcpus: int
    agent_socket: str
    control_socket: str
    console_log: str
    created_at: float
    exit_status: int | None = None
    disks: list[str] = []
    nics: list[str] = []
    agent_transport: AgentTransport = "unix"
    agent_port: int | None = None
    # The export root of the VM's file share (blockd binds container paths into it);
    # None when the backend gives this VM no share device.
    share_dir: str | None = None


class VmList(Reply):
    """All VMs vmmd owns."""

    vms: list[VmInfo]


class StopVm(Request):
    """Stop a VM: clean shutdown, then SIGKILL after `timeout_s`."""

    sandbox_id: SandboxId
    timeout_s: float | None = Field(None, gt=0, le=600)


class AttachDisk(Request):
    """Hot-plug a disk image into a running VM."""

    sandbox_id: SandboxId
    path: str = Field(min_length=1, max_length=4096)
    serial: str = Field(pattern=SERIAL_REGEX)
    format: Literal["raw", "qcow2"] = "raw"
    readonly: bool = False


class DiskInfo(Reply):
    """A disk attached to a VM."""

    device_id: str
    serial: str
    path: str
    # The serial the guest reads for this disk, when the VMM does not pass `serial` through
    # (Firecracker derives it from the backing file); empty means `serial`.
    guest_serial: str = ""


class DetachDisk(Request):
    """Hot-unplug a disk."""

    sandbox_id: SandboxId
    device_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,32}$")


__all__ = ["VmNic", "AttachNic", "DetachNic", "CreateVm", "VmInfo", "VmList", "StopVm", "AttachDisk", "DiskInfo", "DetachDisk",
           "SandboxRef"]


class ChooseBackend(Request):
    """`vm.backend`: which backend a VM asked for with `hypervisor` would get (None: the
    configured one; "auto" resolved by vmmd, the one place that decides it)."""

    hypervisor: Literal["auto", "qemu", "firecracker"] | None = None


class BackendChoice(Reply):
    """The backend and why, and what callers must know before the VM exists: the disk
    formats it opens (preferred first) and its file-share device (None: no share)."""

    backend: str
    reason: str
    disk_formats: list[Literal["qcow2", "raw"]]
    share: str | None = None
