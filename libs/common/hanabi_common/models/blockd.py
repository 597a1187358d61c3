"""Messages of blockd: container root filesystems as block devices."""

from __future__ import annotations

from pydantic import Field

from hanabi_common.models.base import Reply, Request, SandboxId


class ProvisionVolume(Request):
    """Turn a bundle's rootfs into a block device image for the sandbox's VM."""

    sandbox_id: SandboxId
    rootfs: str = Field(min_length=1, max_length=4096)
    readonly: bool = False


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


class VolumeList(Reply):
    """Every volume blockd holds."""

    volumes: list[VolumeInfo]


class BackendInfo(Reply):
    """Which backend blockd uses, and why."""

    backend: str
    reason: str
    volume_dir: str
