"""Messages of netd: the sandbox's network as the VM and the guest need it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from hanabi_common.models.base import Reply, Request, SandboxId

NetworkMode = Literal["none", "tcfilter"]


class AttachNetwork(Request):
    """Wire a sandbox's VM into the container's network namespace (None: no network)."""

    sandbox_id: SandboxId
    netns_path: str | None = Field(None, min_length=1, max_length=4096)


class NetnsInfo(Reply):
    """A network namespace netd made for a sandbox (removed by net.detach)."""

    sandbox_id: str
    path: str


class Route(Reply):
    """One route for the guest: `dest` is a CIDR or "default"; `dev` the guest interface."""

    dest: str
    gateway: str | None = None
    dev: str | None = None
    family: Literal[4, 6] = 4


class Interface(Reply):
    """One guest NIC: the netns link it stands for, the tap the VMM opens, and what the
    guest configures (the link's own name, MAC, MTU and addresses as CIDRs)."""

    name: str
    link: str = ""
    tap: str
    mac: str
    mtu: int
    addresses: list[str] = []


class NetworkInfo(Reply):
    """What netd set up for one sandbox."""

    sandbox_id: str
    mode: NetworkMode
    netns_path: str | None = None
    netns_inode: int | None = None
    interfaces: list[Interface] = []
    routes: list[Route] = []
    dns: list[str] = []
    attach_ms: float | None = None


class NetworkList(Reply):
    """Every sandbox network netd holds."""

    networks: list[NetworkInfo]


class LinkChange(Reply):
    """A link that came (`docker network connect`: netd wired it to `interface.tap`) or went
    (netd unwired it) while the sandbox ran: the orchestrator plugs or unplugs the VM's NIC
    and configures the guest. `seq` counts the sandbox's changes from 1."""

    seq: int
    kind: Literal["added", "removed"]
    interface: Interface
    routes: list[Route] = []


class ChangesAfter(Request):
    """`net.changes`: the sandbox's link changes after `after` (those up to it are done and
    are forgotten)."""

    sandbox_id: SandboxId
    after: int = Field(0, ge=0)


class LinkChanges(Reply):
    """The link changes still to apply, oldest first, and the namespace they are in."""

    netns_path: str | None = None
    changes: list[LinkChange] = []
