"""Messages of blockd: container root filesystems as block devices."""

from __future__ import annotations

from pydantic import Field

from hanabi_common.models.base import Reply, Request, SandboxId


class BindSource(Request):
    """A host file or directory to copy onto the sandbox's mounts disk, under `name`."""

    name: str = Field(pattern=r"^m[0-9]{1,4}$")
    source: str = Field(pattern=r"^/", max_length=4096)


class ProvisionVolume(Request):
    """Turn a bundle's rootfs into a block device image for the sandbox's VM; with `binds`,
    also a second, small disk carrying copies of the bind-mounted host paths."""

    sandbox_id: SandboxId
    rootfs: str = Field(min_length=1, max_length=4096)
    readonly: bool = False
    binds: list[BindSource] = Field([], max_length=256)


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
    binds: "VolumeInfo | None" = None


class VolumeList(Reply):
    """Every volume blockd holds."""

    volumes: list[VolumeInfo]


class BackendInfo(Reply):
    """Which backend blockd uses, and why."""

    backend: str
    reason: str
    volume_dir: str
