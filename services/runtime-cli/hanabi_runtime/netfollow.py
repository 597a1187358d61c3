"""The orchestrator's side of links that come and go while a container runs.

`docker network connect` / `disconnect` change a running container's namespace without a
runtime call. netd sees it, wires or unwires the link's tap and records a LinkChange
(`net.changes`); it calls no other daemon. The runtime owns the sequence that follows, as it
owns the one at create: plug the VM's NIC on the tap (vmmd) and configure it in the guest
(agentd), or unplug it. The container's stand-in runs `follow` for its sandbox: it looks at
netd's state file for the sandbox (a stat, no RPC) and asks netd for the changes once it
changed (the lean client: plain dicts), then marks them done. It looks when netd rings the
sandbox's doorbell (hanabi_common.doorbell: netd rings it for each change it records), and
every BELL_IDLE_S all the same; where no doorbell can be made, every POLL_S.

Light on purpose: `follow` runs in every sandbox's stand-in, one process per container, for
as long as the container runs; while no link changes (nearly always) it imports neither
pydantic nor pyzmq. The typed models and clients that apply a change (`Applier`) are
imported with the first change there is.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from hanabi_common.doorbell import NET_CHANGES_BELL, Doorbell
from hanabi_common.errors import AlreadyExists, HanabiError, NotFound

if TYPE_CHECKING:
    from hanabi_common.config import Config
    from hanabi_common.models.netd import LinkChange, LinkChanges
    from hanabi_runtime.lean.records import LeanConfig

POLL_S = 0.5  # without a doorbell
BELL_IDLE_S = 30.0  # with one: a look this often even without a ring
RETRY_S = 5.0
NET_STATE_NAME = "network"  # netd's state file (hanabi_netd.state.STATE_NAME)
NOTHING_PENDING = {"netns_path", "changes"}  # the fields of an empty LinkChanges reply


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


class Applier:
    """The typed side of following: netd's reply as models, the NICs plugged and configured
    through the typed clients (made at the first change: they import pydantic and pyzmq)."""

    def __init__(self, config: Config, sandbox_id: str) -> None:
        from hanabi_agentd.client import AgentdClient
        from hanabi_vmmd.client import VmmdClient

        self.sandbox_id = sandbox_id
        self.vmmd, self.agentd = VmmdClient(config), AgentdClient(config)

    @staticmethod
    def parse(reply: dict) -> LinkChanges:
        """netd's `net.changes` reply as the model its typed client returns (ValidationError
        as InvalidArgument, as that client raises it)."""
        from pydantic import ValidationError

        from hanabi_common.errors import InvalidArgument
        from hanabi_common.models.netd import LinkChanges

        try:
            return LinkChanges.model_validate(reply)
        except ValidationError as exc:
            raise InvalidArgument(f"netd answered net.changes with a malformed reply: {exc}") from None

    def apply(self, netns_path: str | None, change: LinkChange) -> None:
        """Plug (and configure) or unplug the NIC of one change."""
        apply_change(self.vmmd, self.agentd, self.sandbox_id, netns_path, change)


def follow(config: LeanConfig, full_config: Callable[[], Config], sandbox_id: str, stop: threading.Event,
           warn: Callable[[str], None] = lambda _m: None) -> None:
    """Apply the sandbox's link changes until the sandbox is gone, or `stop` is set (seen
    at the next look). `full_config`: the validated Config, asked for at the first change
    (for the typed clients)."""
    from hanabi_runtime.lean.commands import Daemons

    netd = Daemons(config).netd
    directory = os.path.join(config.sandboxes_dir, sandbox_id)
    path = os.path.join(directory, f"{NET_STATE_NAME}.json")
    try:
        bell: Doorbell | None = Doorbell(os.path.join(directory, NET_CHANGES_BELL))
    except FileNotFoundError:
        return  # the sandbox is gone already
    except OSError as exc:
        warn(f"network changes are looked for every {POLL_S} s: no doorbell ({exc})")
        bell = None
    idle = BELL_IDLE_S if bell is not None else POLL_S
    applier: Applier | None = None
    seen: int | None = None
    done = 0
    delay, said = 0.0, ""  # the first look at once: the bell hears only what comes after it
    while True:
        if bell is not None:
            bell.wait(delay)
        else:
            stop.wait(delay)
        if stop.is_set():
            break
        delay = idle
        try:
            stamp = os.stat(path).st_mtime_ns
        except FileNotFoundError:
            break  # no network (any more): nothing to follow
        except OSError:
            continue
        if stamp == seen:
            continue
        try:
            reply = netd.call("net.changes", {"sandbox_id": sandbox_id, "after": done}, idempotent=True)
            if set(reply) - NOTHING_PENDING or reply.get("changes", []) != []:
                applier = applier or Applier(full_config(), sandbox_id)
                pending = applier.parse(reply)
                for position, change in enumerate(pending.changes):
                    if not superseded(change, pending.changes[position + 1:]):
                        applier.apply(pending.netns_path, change)
                    done = change.seq
                if pending.changes:
                    netd.call("net.changes", {"sandbox_id": sandbox_id, "after": done}, idempotent=True)  # mark them done
            seen = stamp
        except NotFound:
            break  # the sandbox is being deleted
        except HanabiError as exc:  # a daemon restarting, the VM paused: try again, slower
            delay = RETRY_S
            if exc.message != said:
                said = exc.message
                warn(f"network change not applied yet: {exc.message}")
    if bell is not None:
        bell.close()
