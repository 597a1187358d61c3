"""The orchestrator's side of links that come and go while a container runs.

`docker network connect` / `disconnect` change a running container's namespace without a
runtime call. netd sees it, wires or unwires the link's tap and records a LinkChange
(`net.changes`); it calls no other daemon. The runtime owns the sequence that follows, as it
owns the one at create: plug the VM's NIC on the tap (vmmd) and configure it in the guest
(agentd), or unplug it. The container's stand-in runs `follow` for its sandbox: it looks at
netd's state file for the sandbox (a stat, no RPC) and asks netd for the changes once it
changed, then marks them done.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from hanabi_common.config import Config
from hanabi_common.errors import AlreadyExists, HanabiError, NotFound
from hanabi_common.models.netd import LinkChange

POLL_S = 0.5
RETRY_S = 5.0
NET_STATE_NAME = "network"  # netd's state file (hanabi_netd.state.STATE_NAME)


def apply_change(vmmd, agentd, sandbox_id: str, netns_path: str | None, change: LinkChange) -> None:
    """Plug (and configure in the guest) or unplug the VM's NIC of one link change."""
    from hanabi_common.models.agentd import ConfigureNetwork
    from hanabi_common.models.vmmd import VmNic

    iface = change.interface
    if change.kind == "removed":
        try:
            vmmd.detach_nic(sandbox_id, iface.tap, netns_path)
        except NotFound:
            pass  # never plugged (its add was superseded): nothing to unplug
        return
    try:
        vmmd.attach_nic(sandbox_id, VmNic(tap=iface.tap, mac=iface.mac, mtu=iface.mtu, netns_path=netns_path))
    except AlreadyExists:
        pass  # plugged before a restart of this follower: configure it all the same
    agentd.configure_network(ConfigureNetwork(sandbox_id=sandbox_id, interfaces=[iface], routes=change.routes))


def superseded(change: LinkChange, later: list[LinkChange]) -> bool:
    """Whether a later change removes the link `change` adds (a link connected and gone
    again before it was plugged, or whose plugging keeps failing): then only the removal
    is applied, and a failed add does not hold the removal back."""
    return change.kind != "removed" and any(
        c.kind == "removed" and c.interface.tap == change.interface.tap for c in later)


def follow(config: Config, sandbox_id: str, stop: threading.Event,
           warn: Callable[[str], None] = lambda _m: None) -> None:
    """Apply the sandbox's link changes until `stop` is set or the sandbox is gone."""
    from hanabi_agentd.client import AgentdClient
    from hanabi_netd.client import NetdClient
    from hanabi_vmmd.client import VmmdClient

    netd, vmmd, agentd = NetdClient(config), VmmdClient(config), AgentdClient(config)
    path = config.sandboxes_dir / sandbox_id / f"{NET_STATE_NAME}.json"
    seen: int | None = None
    done = 0
    delay, said = POLL_S, ""
    while not stop.wait(delay):
        delay = POLL_S
        try:
            stamp = os.stat(path).st_mtime_ns
        except FileNotFoundError:
            return  # no network (any more): nothing to follow
        except OSError:
            continue
        if stamp == seen:
            continue
        try:
            pending = netd.changes(sandbox_id, after=done)
            for position, change in enumerate(pending.changes):
                if not superseded(change, pending.changes[position + 1:]):
                    apply_change(vmmd, agentd, sandbox_id, pending.netns_path, change)
                done = change.seq
            if pending.changes:
                netd.changes(sandbox_id, after=done)  # mark them done
            seen = stamp
        except NotFound:
            return  # the sandbox is being deleted
        except HanabiError as exc:  # a daemon restarting, the VM paused: try again, slower
            delay = RETRY_S
            if exc.message != said:
                said = exc.message
                warn(f"network change not applied yet: {exc.message}")
