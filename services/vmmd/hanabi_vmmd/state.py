"""vmmd's per-sandbox state file, `hypervisor.json`, and the VM's short socket directory.

The state file holds everything needed to find a VM again after vmmd restarts: the pid
and its start time (so a recycled pid is never mistaken for the VM), the socket paths,
the hot-plugged disks and the slots they occupy. The sockets themselves live in
`<run_dir>/vm/<sha256(sandbox id)[:16]>/`: AF_UNIX paths are limited to 107 bytes and
sandbox ids may be 128 characters long.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from hanabi_common.models.vmmd import VmInfo, VmState
from hanabi_common.state import VersionedState
from hanabi_vmmd.hypervisor import DiskSpec, NicSpec, VmHandle

STATE_NAME = "hypervisor"
VM_DIR_NAME = "vm"
SUN_PATH_MAX = 107


def vm_dir_for(run_dir: Path, sandbox_id: str) -> Path:
    """The short per-VM directory holding its sockets, console log, pid file, stderr log."""
    digest = hashlib.sha256(sandbox_id.encode()).hexdigest()[:16]
    return Path(run_dir) / VM_DIR_NAME / digest


class DiskRecord(BaseModel):
    """One hot-plugged disk."""

    model_config = ConfigDict(extra="forbid")
    device_id: str
    node_name: str
    serial: str
    path: str
    format: Literal["raw", "qcow2"] = "raw"
    readonly: bool = False
    bus: str
    guest_serial: str = ""  # what the guest reads, when the VMM does not pass `serial` through

    def spec(self) -> DiskSpec:
        """The backend's view of this disk."""
        return DiskSpec(device_id=self.device_id, node_name=self.node_name, path=Path(self.path),
                        serial=self.serial, format=self.format, readonly=self.readonly)


class NicRecord(BaseModel):
    """One NIC of the VM: at boot (`bus` "boot") or hot-plugged on a root port."""

    model_config = ConfigDict(extra="forbid")
    device_id: str
    tap: str
    mac: str
    mtu: int = 1500
    netns_path: str | None = None
    bus: str = "boot"

    def spec(self) -> NicSpec:
        """The backend's view of this NIC."""
        return NicSpec(device_id=self.device_id, tap=self.tap, mac=self.mac, mtu=self.mtu,
                       netns_path=self.netns_path)

    @classmethod
    def of(cls, spec: NicSpec, bus: str = "boot") -> NicRecord:
        """The record of a NIC plugged from `spec` into `bus`."""
        return cls(device_id=spec.device_id, tap=spec.tap, mac=spec.mac, mtu=spec.mtu,
                   netns_path=spec.netns_path, bus=bus)


class HypervisorState(VersionedState):
    """What vmmd knows of one sandbox's VM, enough to re-adopt and stop it after a restart."""

    sandbox_id: str
    hypervisor: str
    accel: str
    machine: str = ""
    hotplug_slots: int = 0
    state: VmState
    pid: int
    start_time: int
    exit_status: int | None = None
    memory_mib: int
    vcpus: int
    vm_dir: str
    agent_socket: str
    agent_transport: Literal["unix", "hybrid_vsock", "vsock"] = "unix"
    agent_port: int | None = None
    control_socket: str
    console_log: str
    stderr_log: str
    created_at: float
    disks: list[DiskRecord] = []
    nics: list[NicRecord] = []
    share_dir: str | None = None
    template: str | None = None  # the VM template it was cloned from (templates.py), None: booted

    def handle(self) -> VmHandle:
        """A backend handle for this VM (without a Popen: good for adopted VMs)."""
        return VmHandle(sandbox_id=self.sandbox_id, hypervisor=self.hypervisor, pid=self.pid,
                        start_time=self.start_time, control_socket=Path(self.control_socket),
                        agent_socket=Path(self.agent_socket), vm_dir=Path(self.vm_dir),
                        machine=self.machine, hotplug_slots=self.hotplug_slots,
                        agent_transport=self.agent_transport, agent_port=self.agent_port)

    def info(self) -> VmInfo:
        """The RPC view of this VM."""
        return VmInfo(sandbox_id=self.sandbox_id, hypervisor=self.hypervisor, accel=self.accel,
                      pid=self.pid, state=self.state, memory_mib=self.memory_mib, vcpus=self.vcpus,
                      agent_socket=self.agent_socket, agent_transport=self.agent_transport,
                      agent_port=self.agent_port, control_socket=self.control_socket,
                      console_log=self.console_log, created_at=self.created_at,
                      exit_status=self.exit_status, disks=[d.device_id for d in self.disks],
                      nics=[n.device_id for n in self.nics], share_dir=self.share_dir)

    def busy_slots(self) -> set[str]:
        """The hot-plug slots its disks and NICs hold."""
        return {d.bus for d in self.disks} | {n.bus for n in self.nics}

    def disk(self, device_id: str) -> DiskRecord | None:
        """The attached disk with that device id, if any."""
        return next((d for d in self.disks if d.device_id == device_id), None)
