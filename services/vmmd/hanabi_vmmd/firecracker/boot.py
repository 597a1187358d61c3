"""The API requests that configure and start one container VM under Firecracker (pure).

Firecracker has no block hotplug, so a VM gets `placeholder_drives` extra drives at boot
("ph0", "ph1", ...), each backed by a small sparse file; when a container's volume arrives
vmmd swaps a placeholder's backing file with `PATCH /drives/phN` (`swap_placeholder`).
`FirecrackerApi.replay(boot_sequence(spec))` performs the boot.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from hanabi_common.errors import InvalidArgument
from hanabi_common.models.vmmd import MIN_VM_MEMORY_MIB

from . import models as m

GUEST_CID = 3
PLACEHOLDER_PREFIX = "ph"
PLACEHOLDER_SIZE = 1024 * 1024  # sparse; the guest sees a 1 MiB empty disk

Step = tuple[str, str, BaseModel]


@dataclass(frozen=True)
class DriveSpec:
    drive_id: str
    path_on_host: str
    is_read_only: bool = False
    is_root_device: bool = False


@dataclass(frozen=True)
class FcBootSpec:
    """What a container VM needs from Firecracker's API before InstanceStart."""

    kernel_image_path: str          # uncompressed ELF vmlinux
    initrd_path: str | None
    boot_args: str
    vcpus: int
    memory_mib: int
    vsock_uds_path: str
    drives: tuple[DriveSpec, ...] = ()
    placeholder_drives: int = 4
    placeholder_dir: str = ""       # where ph<N>.img live; required when placeholder_drives > 0
    tap_name: str | None = None
    guest_mac: str | None = None
    iface_id: str = "eth0"
    mtu: int | None = None
    log_path: str | None = None
    log_level: m.LogLevel = "Info"
    metrics_path: str | None = None


def placeholder_id(index: int) -> str:
    return f"{PLACEHOLDER_PREFIX}{index}"


def placeholder_path(spec: FcBootSpec, index: int) -> str:
    return os.path.join(spec.placeholder_dir, f"{placeholder_id(index)}.img")


def observability_steps(log_path: str | None, log_level: m.LogLevel, metrics_path: str | None) -> list[Step]:
    """The logger and metrics calls a Firecracker takes before anything else (booted or
    restored), for those of the two that are wanted."""
    steps: list[Step] = []
    if log_path:
        steps.append(("PUT", "/logger", m.Logger(log_path=log_path, level=log_level,
                                                 show_level=True, show_log_origin=False)))
    if metrics_path:
        steps.append(("PUT", "/metrics", m.Metrics(metrics_path=metrics_path)))
    return steps


def boot_sequence(spec: FcBootSpec) -> list[Step]:
    """(method, path, body) in the order Firecracker needs them, ending with InstanceStart."""
    if spec.vcpus < 1 or spec.vcpus > 32:
        raise InvalidArgument(f"firecracker supports 1..32 vCPUs, not {spec.vcpus}")
    if spec.memory_mib < MIN_VM_MEMORY_MIB:
        raise InvalidArgument(f"VM memory {spec.memory_mib} MiB is below the {MIN_VM_MEMORY_MIB} MiB minimum")
    if spec.placeholder_drives and not spec.placeholder_dir:
        raise InvalidArgument("placeholder drives need a placeholder_dir")
    if (spec.guest_mac is not None) and not spec.tap_name:
        raise InvalidArgument("a guest MAC was given without a tap device")
    ids = [d.drive_id for d in spec.drives]
    ids += [placeholder_id(i) for i in range(spec.placeholder_drives)]
    if len(set(ids)) != len(ids):
        raise InvalidArgument(f"duplicate drive ids: {ids}")
    if sum(d.is_root_device for d in spec.drives) > 1:
        raise InvalidArgument("at most one root drive")

    # logger and metrics first, so the rest of the configuration is logged
    steps = observability_steps(spec.log_path, spec.log_level, spec.metrics_path)
    steps.append(("PUT", "/boot-source", m.BootSource(
        kernel_image_path=spec.kernel_image_path, initrd_path=spec.initrd_path,
        boot_args=spec.boot_args)))
    steps.append(("PUT", "/machine-config", m.MachineConfiguration(
        vcpu_count=spec.vcpus, mem_size_mib=spec.memory_mib, smt=False)))
    for d in spec.drives:
        steps.append(("PUT", f"/drives/{d.drive_id}", m.Drive(
            drive_id=d.drive_id, path_on_host=d.path_on_host, is_root_device=d.is_root_device,
            is_read_only=d.is_read_only)))
    for i in range(spec.placeholder_drives):
        steps.append(("PUT", f"/drives/{placeholder_id(i)}", m.Drive(
            drive_id=placeholder_id(i), path_on_host=placeholder_path(spec, i),
            is_root_device=False, is_read_only=False)))
    if spec.tap_name:
        steps.append(("PUT", f"/network-interfaces/{spec.iface_id}", m.NetworkInterface(
            iface_id=spec.iface_id, host_dev_name=spec.tap_name, guest_mac=spec.guest_mac,
            mtu=spec.mtu)))
    steps.append(("PUT", "/vsock", m.Vsock(guest_cid=GUEST_CID, uds_path=spec.vsock_uds_path)))
    steps.append(("PUT", "/actions", m.INSTANCE_START))
    return steps


def swap_placeholder(index: int, path_on_host: str) -> Step:
    """The post-boot request that points placeholder `index` at a real disk."""
    return ("PATCH", f"/drives/{placeholder_id(index)}",
            m.PartialDrive(drive_id=placeholder_id(index), path_on_host=path_on_host))


def make_placeholder_files(spec: FcBootSpec) -> list[Path]:
    """Create (or truncate to size) the sparse backing files of the placeholders (not pure)."""
    paths = []
    for i in range(spec.placeholder_drives):
        path = Path(placeholder_path(spec, i))
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.truncate(PLACEHOLDER_SIZE)
        paths.append(path)
    return paths
