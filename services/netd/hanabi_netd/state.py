"""netd's per-sandbox state file, network.json."""

from __future__ import annotations

from hanabi_common.models.netd import LinkChange, NetworkInfo
from hanabi_common.state import VersionedState

STATE_NAME = "network"


class NetworkState(VersionedState):
    """What netd made for one sandbox, enough to tear it down after a restart: the
    namespace it created (if it did) and the wiring (once attached)."""

    owned_netns: str | None = None
    network: NetworkInfo | None = None
    # Link changes found while the sandbox runs, for the orchestrator to apply to the VM
    # (net.changes); `change_seq` is the last one's number.
    changes: list[LinkChange] = []
    change_seq: int = 0
    changes_done: int = 0  # the orchestrator applied the changes up to this number
