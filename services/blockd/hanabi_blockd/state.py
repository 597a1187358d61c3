"""blockd's per-sandbox state file, devices.json."""

from __future__ import annotations

from pydantic import BaseModel

from hanabi_common.models.blockd import VolumeInfo
from hanabi_common.state import VersionedState

STATE_NAME = "devices"


class HostMount(BaseModel):
    """A block device blockd took from its host mount for passthrough, to mount back."""

    device: str
    major: int
    minor: int
    fstype: str
    mount_point: str
    options: str


class ShareRecord(BaseModel):
    """What blockd bind-mounted into a VM's export root for one container (recorded before
    the first mount, so a crash in between is undone too)."""

    share_root: str
    container_id: str
    names: list[str]


class DevicesState(VersionedState):
    """The volumes blockd made for one sandbox. `complete` is False only between taking a
    passthrough device from the host and recording its volume: a restart then gives the
    device back and drops the record."""

    volumes: list[VolumeInfo]
    host_mount: HostMount | None = None
    shares: list[ShareRecord] = []
    complete: bool = True
