"""Messages of agentd: containers and processes inside the guest."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from hanabi_common.models.base import ContainerId, ExecId, Reply, Request, SandboxId
from hanabi_common.models.netd import Interface, Route
from hanabi_wire import ID_REGEX, INIT_EXEC_ID, MAX_SIGNAL, SERIAL_REGEX, SHARE_ROOTFS_REGEX


class ConnectAgent(Request):
    """Connect to a sandbox's agent socket and wait until the agent answers."""

    sandbox_id: SandboxId
    socket_path: str = Field(min_length=1, max_length=4096)
    timeout_s: float | None = Field(None, gt=0, le=600)
    # How to use socket_path (vmmd's VmInfo.agent_transport/agent_port): "unix" connects to
    # it; "hybrid_vsock" connects and sends `CONNECT <port>`; "vsock" means AF_VSOCK to
    # the CID in socket_path ("vsock://CID") and `port`.
    transport: Literal["unix", "hybrid_vsock", "vsock"] = "unix"
    port: int | None = Field(None, ge=1, lt=1 << 32)


class AgentInfo(Reply):
    """The agent of one sandbox."""

    sandbox_id: str
    agent_version: str
    kernel: str
    connected: bool = True
    ready_s: float | None = None


class RootfsSpec(Request):
    """What the guest mounts as the container's root: the disk with virtio serial `serial`,
    or (`share`, with fstype "9p") a directory of the VM's file share, relative to it."""

    serial: str | None = Field(None, pattern=SERIAL_REGEX)
    fstype: Literal["ext4", "9p"] = "ext4"
    readonly: bool = False
    share: str | None = Field(None, pattern=SHARE_ROOTFS_REGEX)

    @model_validator(mode="after")
    def _one_source(self) -> RootfsSpec:
        if (self.serial is None) == (self.share is None):
            raise ValueError("a rootfs is either a disk (serial) or a share directory (share)")
        if (self.share is not None) != (self.fstype == "9p"):
            raise ValueError("a share rootfs has fstype 9p, a disk ext4")
        return self


class DiskSpec(Request):
    """A disk the guest mounts by its virtio serial (the mounts disk)."""

    serial: str = Field(pattern=SERIAL_REGEX)
    fstype: Literal["ext4"] = "ext4"
    readonly: bool = False


class GuestMount(Request):
    """A mount the agent makes in the container: a bind of an entry of the container's
    share directory (or of a copy that travelled on the mounts disk): `source` names it
    there; or a tmpfs."""

    destination: str = Field(pattern=r"^/", max_length=4096)
    type: Literal["bind", "tmpfs"]
    source: str | None = Field(None, pattern=r"^m[0-9]{1,4}$")
    options: list[Annotated[str, Field(max_length=128)]] = Field([], max_length=32)


class CreateContainer(Request):
    """Prepare a container in the guest (its process is not started yet)."""

    sandbox_id: SandboxId
    container_id: ContainerId
    rootfs: RootfsSpec
    process: dict[str, Any]
    hostname: str | None = Field(None, max_length=255)
    mounts: list[GuestMount] = Field([], max_length=256)
    mounts_disk: DiskSpec | None = None
    # The container's directory in the VM's file share (binds' `source` entries live there).
    share: str | None = Field(None, pattern=ID_REGEX)
    # The subset of the OCI `linux` object the guest applies (namespaces, maskedPaths,
    # readonlyPaths, sysctl, seccomp, devices, resources, uid/gidMappings,
    # rootfsPropagation, mountLabel) plus the config's top-level `domainname`; validated
    # in the guest (docs/agent-protocol.md). None: the guest applies none of it.
    linux: dict[str, Any] | None = None
    # A container of a Kubernetes pod: `ipc`/`uts` -> the container of the same VM (the
    # pod's sandbox) whose init's namespace its init joins (hanabi_runtime.pod).
    join_namespaces: dict[Literal["ipc", "uts"], ContainerId] | None = None


class ConfigureNetwork(Request):
    """Configure the guest's NICs and routes as netd reported them (empty: loopback only)."""

    sandbox_id: SandboxId
    interfaces: list[Interface] = Field([], max_length=8)
    routes: list[Route] = Field([], max_length=64)
    # Loopback resolvers of the container's namespace (Docker's 127.0.0.11) the guest
    # relays its queries to, through agentd, and that namespace.
    dns_relay: list[Annotated[str, Field(pattern=r"^127\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$")]] = Field(
        [], max_length=4)
    dns_netns: str | None = Field(None, max_length=4096)


class ContainerRef(Request):
    """Names one container."""

    sandbox_id: SandboxId
    container_id: ContainerId


class StartedProcess(Reply):
    """A process the agent started."""

    pid: int


class ExecProcess(Request):
    """Start one more process in a running container."""

    sandbox_id: SandboxId
    container_id: ContainerId
    exec_id: ExecId
    process: dict[str, Any]


class SignalProcess(Request):
    """Send a signal to a container's process (or all of them)."""

    sandbox_id: SandboxId
    container_id: ContainerId
    exec_id: ExecId = INIT_EXEC_ID
    signal: int = Field(ge=1, le=MAX_SIGNAL)
    all: bool = False


ProcessStatus = Literal["created", "running", "stopped"]


class ProcessState(Reply):
    """What agentd knows of one process."""

    exec_id: str
    status: ProcessStatus
    pid: int | None = None
    exit_code: int | None = None
    signal: int | None = None

    @property
    def exit_status(self) -> int | None:
        """The shell-style status: the exit code, or 128+N when killed by signal N."""
        if self.signal is not None:
            return 128 + self.signal
        return self.exit_code


class ContainerState(Reply):
    """What agentd knows of one container."""

    sandbox_id: str
    container_id: str
    status: ProcessStatus
    processes: list[ProcessState] = []


class GuestProcess(Reply):
    """One process as the guest's ps sees it."""

    pid: int
    exec_id: str
    args: list[str] = []


class ProcessList(Reply):
    """Processes of a container."""

    processes: list[GuestProcess]
