"""Pydantic models of the Firecracker API bodies hanabi sends and the replies it parses.

Field names, types, enums and bounds follow the definitions of the vendored spec
(`firecracker-v1.16.1.yaml`); request models forbid unknown fields so a typo fails here
and not inside Firecracker. Bodies are sent with `to_body()` (None fields left out).
Replies are parsed leniently (extra fields ignored) so a newer Firecracker that adds a
field does not break inspection.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_body(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


class _Reply(BaseModel):
    model_config = ConfigDict(extra="ignore")


# -- requests ---------------------------------------------------------------------------

class TokenBucket(_Request):
    size: int = Field(ge=0)
    refill_time: int = Field(ge=0)
    one_time_burst: int | None = Field(default=None, ge=0)


class RateLimiter(_Request):
    bandwidth: TokenBucket | None = None
    ops: TokenBucket | None = None


class BootSource(_Request):
    """PUT /boot-source: an uncompressed ELF vmlinux (x86_64), optional initrd, cmdline."""

    kernel_image_path: str
    boot_args: str | None = None
    initrd_path: str | None = None


class Drive(_Request):
    """PUT /drives/{drive_id}: a virtio-block drive."""

    drive_id: str
    is_root_device: bool
    path_on_host: str | None = None
    is_read_only: bool | None = None
    partuuid: str | None = None
    cache_type: Literal["Unsafe", "Writeback"] | None = None
    io_engine: Literal["Sync", "Async"] | None = None
    rate_limiter: RateLimiter | None = None
    socket: str | None = None


class PartialDrive(_Request):
    """PATCH /drives/{drive_id} (post-boot): swap a drive's backing file, e.g. a placeholder."""

    drive_id: str
    path_on_host: str | None = None
    rate_limiter: RateLimiter | None = None


CpuTemplate = Literal["C3", "T2", "T2S", "T2CL", "T2A", "V1N1", "None"]


class MachineConfiguration(_Request):
    """PUT /machine-config; also the reply of GET /machine-config (see MachineConfigurationInfo)."""

    vcpu_count: int = Field(ge=1, le=32)
    mem_size_mib: int = Field(ge=1)
    smt: bool | None = None
    track_dirty_pages: bool | None = None
    cpu_template: CpuTemplate | None = None
    huge_pages: Literal["None", "2M"] | None = None


class NetworkInterface(_Request):
    """PUT /network-interfaces/{iface_id}: a virtio-net device backed by a host tap."""

    iface_id: str
    host_dev_name: str
    guest_mac: str | None = None
    mtu: int | None = Field(default=None, ge=68, le=65535)
    rx_rate_limiter: RateLimiter | None = None
    tx_rate_limiter: RateLimiter | None = None


class Vsock(_Request):
    """PUT /vsock: hybrid vsock; host connects to `uds_path`, guest to `uds_path_<port>`."""

    guest_cid: int = Field(ge=3)
    uds_path: str
    vsock_id: str | None = None


LogLevel = Literal["Error", "Warning", "Info", "Debug", "Trace", "Off"]


class Logger(_Request):
    """PUT /logger."""

    log_path: str | None = None
    level: LogLevel | None = None
    show_level: bool | None = None
    show_log_origin: bool | None = None
    module: str | None = None


class Metrics(_Request):
    """PUT /metrics."""

    metrics_path: str


class InstanceActionInfo(_Request):
    """PUT /actions."""

    action_type: Literal["FlushMetrics", "InstanceStart", "SendCtrlAltDel"]


class Vm(_Request):
    """PATCH /vm: pause or resume."""

    state: Literal["Paused", "Resumed"]


class SnapshotCreateParams(_Request):
    """PUT /snapshot/create (the VM must be paused)."""

    snapshot_path: str
    mem_file_path: str
    snapshot_type: Literal["Full", "Diff"] | None = None


class MemoryBackend(_Request):
    backend_type: Literal["File", "Uffd"]
    backend_path: str


class NetworkOverride(_Request):
    iface_id: str
    host_dev_name: str


class VsockOverride(_Request):
    uds_path: str


class SnapshotLoadParams(_Request):
    """PUT /snapshot/load (fresh process only). Give `mem_backend` (mem_file_path is deprecated)."""

    snapshot_path: str
    mem_backend: MemoryBackend | None = None
    mem_file_path: str | None = None
    track_dirty_pages: bool | None = None
    resume_vm: bool | None = None
    network_overrides: list[NetworkOverride] | None = None
    vsock_override: VsockOverride | None = None
    clock_realtime: bool | None = None

    def model_post_init(self, __context: Any) -> None:
        if (self.mem_backend is None) == (self.mem_file_path is None):
            raise ValueError("exactly one of mem_backend and mem_file_path must be given")


# -- replies ----------------------------------------------------------------------------

class InstanceInfo(_Reply):
    """GET / reply."""

    app_name: str
    id: str
    state: Literal["Not started", "Running", "Paused"]
    vmm_version: str


class MachineConfigurationInfo(_Reply):
    """GET /machine-config reply (same definition as the PUT body, parsed leniently)."""

    vcpu_count: int
    mem_size_mib: int
    smt: bool | None = None
    track_dirty_pages: bool | None = None
    cpu_template: str | None = None
    huge_pages: str | None = None


class ApiError(_Reply):
    """Body of every Firecracker error reply."""

    fault_message: str = ""


# action shorthands
INSTANCE_START = InstanceActionInfo(action_type="InstanceStart")
SEND_CTRL_ALT_DEL = InstanceActionInfo(action_type="SendCtrlAltDel")
FLUSH_METRICS = InstanceActionInfo(action_type="FlushMetrics")
