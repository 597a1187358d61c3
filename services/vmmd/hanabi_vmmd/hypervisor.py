"""The hypervisor interface vmmd's service talks to, whatever VMM runs underneath.

A backend (QEMU today, Firecracker next) turns a `VmSpec` into a running VM and returns a
`VmHandle`. The handle is plain data: everything needed to reach the VM again (pid, its
start time, socket paths) is in it, so a restarted vmmd rebuilds handles from its state
files (`hanabi_vmmd.state`) and keeps using the same backend methods. Only the
`process` field (the `Popen` of a VM this vmmd spawned) is not persisted.

Hot-plug slots are backend-specific strings (a PCIe root port for QEMU q35, a placeholder
drive for Firecracker); the service records which ones are in use and passes them back.

What a backend can do is data, `capabilities()`: the service asks it instead of probing
attributes or naming backends (which one serves the warm pool, which one has templates, a
file share, NIC hot-plug, which disk formats it opens, what its files in the VM's directory
are called).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol
from collections.abc import Callable, Collection

Accel = Literal["kvm", "tcg"]
HotplugKind = Literal["disk", "nic"]


@dataclass(frozen=True)
class VmFiles:
    """The names of a backend's files in a VM's directory."""

    control_socket: str
    pid_file: str
    stderr_log: str
    agent_socket: str = "agent.sock"
    console_log: str = "console.log"


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do (pure data, the same for every VM of the backend)."""

    hotplug: frozenset[HotplugKind]  # device kinds it adds to a running VM
    pooling: bool  # can boot VMs ahead and hand them out (needs NIC hot-plug: a pooled VM gets its NICs later)
    templates: bool  # clones VMs from templates (templates.py)
    spares: bool  # a clone's VMM can be started ahead and get its template's state later (spares.py)
    vsock: Literal["hybrid", "vhost"] | None  # the agent channel's vsock kind; None: virtio-serial
    pause: bool  # stops and restarts vCPUs
    snapshots: bool  # writes and restores full snapshots
    share: str | None  # the file-share device of a VM with a share_dir ("virtio-9p", "9p-vsock"), or none
    share_servers: bool  # the share is served by host processes (diod) that end with the VM, not by the VMM
    disk_formats: tuple[Literal["raw", "qcow2"], ...]  # the disk image formats it opens, preferred first
    guest_serial_from_path: bool  # the guest sees a disk's serial derived from its file, not the requested one
    files: VmFiles
    hotplug_slots: int = 0  # slots a VM gets for hot-plugged devices (QEMU root ports, Firecracker placeholder drives)
    mergeable_memory: bool = False  # marks guest RAM mergeable for KSM when vmm.ksm asks (hostmem)


@dataclass(frozen=True)
class VmSpec:
    """Everything a backend needs to boot one VM."""

    sandbox_id: str
    memory_mib: int
    vcpus: int
    kernel: Path
    initrd: Path
    cmdline: str
    accel: Accel
    vm_dir: Path
    agent_socket: Path
    control_socket: Path
    console_log: Path
    pid_file: Path
    stderr_log: Path
    hotplug_slots: int = 4
    nics: tuple[NicSpec, ...] = ()
    # The export root of the VM's file share (None: no share device). See shares.py.
    share_dir: Path | None = None
    # VM templates (templates.py): the guest RAM as a file (`memory_shared`: the template
    # writes it, MAP_SHARED; a clone maps it private, copy-on-write), and `incoming`: QEMU
    # waits for the device state (`-incoming defer`) instead of booting.
    memory_file: Path | None = None
    memory_shared: bool = False
    incoming: bool = False
    # Where the VM's empty placeholder drives live when not in vm_dir (Firecracker): a
    # template's are at a path that outlives its build, since its snapshot names them.
    drive_dir: Path | None = None

    @classmethod
    def in_dir(cls, sandbox_id: str, vm_dir: Path, files: VmFiles, **kwargs: Any) -> VmSpec:
        """A spec whose sockets, console log, pid file and stderr log live in `vm_dir`,
        named as the backend names them (`Capabilities.files`)."""
        return cls(sandbox_id=sandbox_id, vm_dir=vm_dir,
                   agent_socket=vm_dir / files.agent_socket, control_socket=vm_dir / files.control_socket,
                   console_log=vm_dir / files.console_log, pid_file=vm_dir / files.pid_file,
                   stderr_log=vm_dir / files.stderr_log, **kwargs)


@dataclass
class VmHandle:
    """A running (or once running) VM as a backend knows it."""

    sandbox_id: str
    hypervisor: str
    pid: int
    start_time: int
    control_socket: Path
    agent_socket: Path
    vm_dir: Path
    machine: str = ""
    hotplug_slots: int = 0
    process: subprocess.Popen | None = field(default=None, repr=False, compare=False)
    # How agentd reaches the guest agent: "unix" (agent_socket is a stream socket),
    # "hybrid_vsock" (agent_socket is Firecracker's vsock socket, CONNECT agent_port) or
    # "vsock" (AF_VSOCK to the guest's CID, agent_port).
    agent_transport: str = "unix"
    agent_port: int | None = None

    @property
    def spawned_here(self) -> bool:
        """True when this vmmd process is the VM's parent (it can read the exit status)."""
        return self.process is not None


@dataclass(frozen=True)
class DiskSpec:
    """A disk to hot-plug: the host file or block device and how the guest sees it."""

    device_id: str
    node_name: str
    path: Path
    serial: str
    format: Literal["raw", "qcow2"] = "raw"
    readonly: bool = False


@dataclass(frozen=True)
class NicSpec:
    """A NIC: the tap netd made (in `netns_path`, None for the host's) and the guest's MAC."""

    device_id: str
    tap: str
    mac: str
    mtu: int = 1500
    netns_path: str | None = None


@dataclass(frozen=True)
class StopResult:
    """How a VM ended: `exit_status` is None when vmmd is not its parent."""

    was_running: bool
    exit_status: int | None
    killed: bool


class Hypervisor(Protocol):
    """What vmmd's service needs from a VMM backend. Every method raises HanabiError."""

    name: str
    binary: str  # the VMM executable (a template is valid for one VMM build)
    machine: str  # the machine model ("" where there is one)

    def capabilities(self) -> Capabilities:
        """What this backend can do (hot-plug kinds, pooling, templates, share, ...)."""

    def problem(self) -> str | None:
        """Why this backend cannot run VMs on this host (a missing or too old binary), or
        None when it can. Probed once; `auto` chooses with it."""

    def guest_serial(self, handle: VmHandle, disk: DiskSpec) -> str:
        """The serial the guest will read for `disk` when it differs from `disk.serial`
        (`capabilities().guest_serial_from_path`), else ""."""

    def start(self, spec: VmSpec, on_spawned: Callable[[VmHandle], None] | None = None) -> VmHandle:
        """Boot a VM; return once its control channel answers (not the guest agent).

        `on_spawned` is called as soon as the process exists (to record it before the
        slow part). On failure nothing is left running and the error says why.
        """

    def save_template(self, handle: VmHandle, state_file: Path, memory_file: Path) -> int:
        """Save a template VM at agent-ready (backends whose `capabilities().templates`; the
        others raise FailedPrecondition): stop its vCPUs, write its state to `state_file` and
        its RAM to `memory_file` (QEMU: that is the spec's memory file already, mapped
        shared); the state's size in bytes. The VM stays stopped until `stop` ends it."""

    def restore(self, spec: VmSpec, state_file: Path,
                on_spawned: Callable[[VmHandle], None] | None = None) -> VmHandle:
        """Start a clone of a template (`capabilities().templates`): `spec.memory_file` is the
        template's RAM, mapped private, `state_file` its saved state; the clone runs once this
        returns. `on_spawned` as for `start`; on failure nothing is left running."""

    def start_clone_vmm(self, spec: VmSpec, on_spawned: Callable[[VmHandle], None] | None = None) -> VmHandle:
        """The first half of `restore` (`capabilities().spares`; the others raise
        FailedPrecondition): the clone's VMM, started and answering, waiting for its state."""

    def load_clone(self, handle: VmHandle, spec: VmSpec, state_file: Path) -> None:
        """The second half of `restore`: load `state_file` into a VMM from `start_clone_vmm`
        and let the clone run; on failure the VMM is killed and reaped."""

    def attach_disk(self, handle: VmHandle, disk: DiskSpec, busy_slots: Collection[str]) -> str:
        """Hot-plug `disk`; return the slot it took (one not in `busy_slots`)."""

    def detach_disk(self, handle: VmHandle, disk: DiskSpec, timeout: float) -> None:
        """Hot-unplug `disk` and release its backend node; idempotent."""

    def attach_nic(self, handle: VmHandle, nic: NicSpec, busy_slots: Collection[str]) -> str:
        """Hot-plug `nic`; return the slot it took. Backends without NIC hotplug raise
        FailedPrecondition (Firecracker takes its NICs in the VmSpec, at boot)."""

    def detach_nic(self, handle: VmHandle, nic: NicSpec, timeout: float) -> None:
        """Hot-unplug `nic`; idempotent. Backends without NIC hotplug raise FailedPrecondition."""

    def pause(self, handle: VmHandle) -> None:
        """Stop the vCPUs."""

    def resume(self, handle: VmHandle) -> None:
        """Restart the vCPUs."""

    def query_paused(self, handle: VmHandle) -> bool | None:
        """Whether the VM's vCPUs are stopped; None if the VM cannot be asked."""

    def stop(self, handle: VmHandle, timeout: float) -> StopResult:
        """End the VM: clean shutdown, then SIGKILL after `timeout`; always reap."""

    def is_alive(self, handle: VmHandle) -> bool:
        """True while the VM's process runs (and is the same process, not a reused pid)."""
