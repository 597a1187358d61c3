"""blockd's per-sandbox state file, devices.json."""

from __future__ import annotations

from hanabi_common.models.blockd import VolumeInfo
from hanabi_common.state import VersionedState

STATE_NAME = "devices"


class DevicesState(VersionedState):
    """The volumes blockd made for one sandbox."""

    volumes: list[VolumeInfo]
