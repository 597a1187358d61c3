"""hanabi's configuration: one TOML file, every key optional, defaults for all.

The file is `/etc/hanabi/hanabi.toml`, or the path in `$HANABI_CONFIG`, or one given
explicitly. Tests point `HANABI_CONFIG` at a file that moves `run_dir` under a temp dir.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hanabi_common.errors import InvalidArgument
from hanabi_common.models.vmmd import MAX_VCPUS, MAX_VM_MEMORY_MIB, MIN_VM_MEMORY_MIB
from hanabi_wire.constants import OUTPUT_BUFFER_MAX

DEFAULT_CONFIG_PATH = Path("/etc/hanabi/hanabi.toml")
CONFIG_ENV = "HANABI_CONFIG"
DAEMONS = ("vmmd", "netd", "blockd", "agentd")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FirecrackerConfig(_Section):
    """The Firecracker backend (`[vmm.firecracker]`): binary, jailer, placeholder drives."""

    binary: str = "firecracker"
    jailer: bool = False  # run it through Firecracker's jailer (chroot, uid/gid, cgroup, netns)
    jailer_binary: str = "jailer"
    jailer_uid: int = Field(0, ge=0)
    jailer_gid: int = Field(0, ge=0)
    chroot_base: Path = Path("/srv/jailer")
    cgroup_version: Literal[1, 2] = 2
    placeholder_drives: int = Field(4, ge=0, le=16)  # drives swapped in after boot
    log_level: Literal["Error", "Warning", "Info", "Debug", "Trace", "Off"] = "Info"
    # The 9P server of the file share (9P over vsock); without it binds are copies
    diod: str = "diod"


class VmmConfig(_Section):
    """How vmmd starts VMs."""

    # auto: Firecracker where its binary (>= 1.8) and a working KVM exist, QEMU otherwise
    hypervisor: Literal["auto", "qemu", "firecracker"] = "auto"
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    qemu_binary: str = "qemu-system-x86_64"
    machine: Literal["q35", "pc"] = "q35"
    memory_mib: int = Field(256, ge=MIN_VM_MEMORY_MIB, le=MAX_VM_MEMORY_MIB)
    vcpus: int = Field(1, ge=1, le=MAX_VCPUS)
    guest_dir: Path = Path("/var/lib/hanabi/guest/current")
    kernel_cmdline_extra: str = ""
    boot_timeout_s: float = Field(60.0, gt=0)
    stop_timeout_s: float = Field(5.0, gt=0)
    # Warm pool: VMs of the default size kept booted ahead of demand (QEMU; 0 turns it off).
    pool_size: int = Field(0, ge=0, le=64)
    # VM templates (QEMU; Firecracker without the jailer, VMs without NICs): a VM is a clone of
    # a VM booted once per guest image and size, restored instead of booted (clones share the
    # template's memory pages)
    templates: bool = True
    # Clone VMM processes started ahead for the template cloned last, waiting for its state
    # (QEMU takes ~50 ms to start here); each holds ~16 MiB of its own, charged to vmmd; 0 turns them off
    spare_vmms: int = Field(1, ge=0, le=8)
    # Transparent huge pages for the VMMs vmmd starts. false: vmmd sets PR_SET_THP_DISABLE on
    # itself, which every VMM it spawns inherits (under TCG, QEMU's translation buffer and its
    # 2 MiB ACPI block stop being backed by 2 MiB pages: about 3 MiB less per clone); true:
    # the host's policy (/sys/kernel/mm/transparent_hugepage) applies to them.
    transparent_hugepages: bool = False
    # Kernel samepage merging of guest RAM (QEMU only: its mem-merge). true: guest RAM is marked
    # mergeable, and a host whose ksmd runs (/sys/kernel/mm/ksm/run = 1; vmmd does not set it)
    # merges pages that are identical across VMs (about 7 MiB less per idle clone here) for
    # ksmd's CPU, and opens a side channel between VMs (CVE-2015-2877). false: never merged.
    ksm: bool = False
    firecracker: FirecrackerConfig = FirecrackerConfig()


class AgentConfig(_Section):
    """How agentd talks to the in-guest agent."""

    ready_timeout_s: float = Field(60.0, gt=0)
    request_timeout_s: float = Field(30.0, gt=0)
    # Output of a process agentd holds for its stand-in; at most what the guest resends
    # after agentd restarts (hanabi_wire.OUTPUT_BUFFER_MAX), so a kill -9 loses none of it.
    output_buffer_bytes: int = Field(4 << 20, ge=4096, le=OUTPUT_BUFFER_MAX)
    # The container's linux.seccomp is enforced in the guest (libseccomp). false turns it
    # off explicitly: the profile is not sent and the runtime logs a warning per container.
    seccomp: bool = True


class BlockConfig(_Section):
    """How blockd provisions root filesystems."""

    backend: Literal["auto", "loopfile", "devicemapper"] = "auto"
    # How a directory rootfs reaches the VM. "share": the directory itself, live over the
    # VM's 9P share (writes land in Docker's layer / the bundle's rootfs, as under runc).
    # "block": a copy-on-write block layer over a per-image base (faster reads, but the
    # container's writes stay in that layer and never reach the rootfs directory).
    # A VM without a share device (Firecracker without diod) always takes "block".
    rootfs: Literal["share", "block"] = "share"
    volume_dir: Path = Path("/var/lib/hanabi/volumes")
    headroom_mib: int = Field(64, ge=0)
    max_volume_mib: int = Field(64 * 1024, ge=16)
    # Shared base volumes (one per image) kept for reuse; beyond this many MiB on disk the
    # least recently used ones that no sandbox holds are removed.
    bases_budget_mib: int = Field(8 * 1024, ge=0)
    # devicemapper backend: a thin pool on the named block devices, or (when unset) on
    # sparse loop-backed files under dm_dir, like Docker's loop-lvm (logged as a warning).
    dm_pool_name: str = Field("hanabi-pool", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    dm_data_device: Path | None = None
    dm_metadata_device: Path | None = None
    dm_dir: Path = Path("/var/lib/hanabi/devicemapper")
    dm_data_size_gib: int = Field(100, ge=1)
    dm_metadata_size_mib: int = Field(2048, ge=2, le=16 * 1024)
    dm_block_size_kib: int = Field(64, ge=64, le=1024 * 1024)


class RpcConfig(_Section):
    """ZeroMQ RPC limits."""

    max_message_bytes: int = Field(4 << 20, ge=1024)
    default_timeout_s: float = Field(30.0, gt=0)
    workers: int = Field(8, ge=1, le=256)


class MetricsConfig(_Section):
    """Prometheus metrics over HTTP (always available through each daemon's `ctl metrics`)."""

    listen: str = "127.0.0.1"
    # 0: no HTTP; else vmmd, netd, blockd and agentd serve /metrics on port_base + 0..3
    port_base: int = Field(0, ge=0, le=65531)


class Config(_Section):
    """The whole configuration."""

    run_dir: Path = Path("/run/hanabi")
    log_dir: Path = Path("/var/log/hanabi")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    vmm: VmmConfig = VmmConfig()
    agent: AgentConfig = AgentConfig()
    block: BlockConfig = BlockConfig()
    rpc: RpcConfig = RpcConfig()
    metrics: MetricsConfig = MetricsConfig()
    source: Path | None = None

    def endpoint(self, daemon: str) -> str:
        """The ZeroMQ endpoint of one daemon."""
        return f"ipc://{self.socket_path(daemon)}"

    def socket_path(self, daemon: str) -> Path:
        """The Unix socket file behind a daemon's endpoint."""
        if daemon not in DAEMONS:
            raise InvalidArgument(f"unknown daemon {daemon!r}; known: {', '.join(DAEMONS)}")
        return self.run_dir / f"{daemon}.sock"

    @property
    def sandboxes_dir(self) -> Path:
        """Where the per-sandbox state directories live."""
        return self.run_dir / "sbs"

    @property
    def shares_dir(self) -> Path:
        """Where each VM's file-share export root lives (vmmd makes and removes the empty
        directory; blockd owns the bind mounts inside it). Never under a VM directory,
        which vmmd removes whole."""
        return self.run_dir / "shares"


def config_path(explicit: str | os.PathLike | None = None) -> Path | None:
    """The config file to read: explicit, then $HANABI_CONFIG, then the default if present."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None


def load_config(explicit: str | os.PathLike | None = None) -> Config:
    """Load and validate the configuration; raise InvalidArgument with the reason."""
    path = config_path(explicit)
    if path is None:
        return Config()
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidArgument(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"config file {path} is not valid TOML: {exc}") from None
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise InvalidArgument(f"config file {path} is invalid: {exc}") from None
    return config.model_copy(update={"source": path})
