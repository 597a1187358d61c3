"""Messages of blockd: container root filesystems as block devices."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from hanabi_common.models.base import ContainerId, Reply, Request, SandboxId


class BindSource(Request):
    """A host file or directory the container bind-mounts, under `name`: shared live into
    the VM (with `share_root`), else copied onto the sandbox's mounts disk."""

    name: str = Field(pattern=r"^m[0-9]{1,4}$")
    source: str = Field(pattern=r"^/", max_length=4096)
    readonly: bool = False


class ProvisionVolume(Request):
    """Turn a bundle's rootfs into a block device image for the sandbox's VM; with `binds`,
    also a second, small disk carrying copies of the bind-mounted host paths."""

    sandbox_id: SandboxId
    rootfs: str = Field(min_length=1, max_length=4096)
    readonly: bool = False
    binds: list[BindSource] = Field([], max_length=256)
    # The disk formats the VM can open, preferred first: QEMU takes a qcow2 layer over the
    # shared base; Firecracker takes raw files only (it gets a reflink/sparse copy).
    formats: list[Literal["qcow2", "raw"]] = Field(["qcow2", "raw"], min_length=1, max_length=2)
    # The VM's 9P export root (VmInfo.share_dir): when set, the rootfs directory and the
    # binds are bind-mounted into `<share_root>/<container_id>/` instead of copied (a rootfs
    # that is a whole block device's mount is still passed through as a disk).
    share_root: str | None = Field(None, pattern=r"^/", max_length=4096)
    container_id: ContainerId | None = None


class VolumeInfo(Reply):
    """A provisioned volume."""

    sandbox_id: str
    backend: str
    path: str
    format: str
    fstype: str
    size_bytes: int
    serial: str
    source: str
    binds: VolumeInfo | None = None
    # How the volume was made: "layer" (qcow2 over a shared base), "copy" (raw copy of a
    # base), "passthrough" (the rootfs's own block device), "image" (an image of its own),
    # "share" (no disk: the rootfs directory itself, in the VM's file share).
    layout: Literal["layer", "copy", "passthrough", "image", "share"] = "image"
    # With a file share: the container's directory in the export root (relative to it),
    # holding `rootfs` (layout "share") and the binds m0..mN.
    share: str | None = None
    base_key: str | None = None
    base_path: str | None = None
    detail: str = ""


class VolumeList(Reply):
    """Every volume blockd holds."""

    volumes: list[VolumeInfo]


class BackendInfo(Reply):
    """Which backend blockd uses, and why."""

    backend: str
    reason: str
    volume_dir: str


class BaseInfo(Reply):
    """A shared base volume: one image, read-only, used by every container of it."""

    key: str
    kind: str
    detail: str
    path: str
    source: str
    size_bytes: int
    allocated_bytes: int
    created_at: float
    last_used: float
    holders: list[str]


class PoolInfo(Reply):
    """A place volumes are made in, its usage and health."""

    name: str
    backend: str
    path: str
    total_bytes: int
    free_bytes: int
    bases_bytes: int
    bases_budget_bytes: int
    healthy: bool
    detail: str = ""


class BlockListing(Reply):
    """Everything blockd holds: pools, bases (with their holders), volumes."""

    backend: str
    reason: str
    pools: list[PoolInfo]
    bases: list[BaseInfo]
    volumes: list[VolumeInfo]


class CollectBases(Request):
    """Collect unused bases beyond the budget now (`budget_mib` overrides the configured one)."""

    budget_mib: int | None = Field(None, ge=0)


class Collected(Reply):
    """The bases a collection removed."""

    removed: list[str]
