"""netd's per-sandbox state file, network.json."""

from __future__ import annotations

from hanabi_common.models.netd import NetworkInfo
from hanabi_common.state import VersionedState

STATE_NAME = "network"


class NetworkState(VersionedState):
    """What netd made for one sandbox, enough to tear it down after a restart: the
    namespace it created (if it did) and the wiring (once attached)."""

    owned_netns: str | None = None
    network: NetworkInfo | None = None
