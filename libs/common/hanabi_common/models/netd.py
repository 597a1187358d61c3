"""Messages of netd: the sandbox's network as the VM and the guest need it."""

from __future__ import annotations

from pydantic import Field

from hanabi_common.models.base import Reply, Request, SandboxId


class AttachNetwork(Request):
    """Wire a sandbox's VM into the container's network namespace (None: no network)."""

    sandbox_id: SandboxId
    netns_path: str | None = Field(None, max_length=4096)


class Route(Reply):
    """One route for the guest."""

    dest: str
    gateway: str | None = None


class Interface(Reply):
    """One guest NIC: the tap the VMM opens, and what the guest configures."""

    name: str
    tap: str
    mac: str
    mtu: int
    addresses: list[str] = []


class NetworkInfo(Reply):
    """What netd set up for one sandbox."""

    sandbox_id: str
    mode: str
    netns_path: str | None = None
    interfaces: list[Interface] = []
    routes: list[Route] = []
    dns: list[str] = []


class NetworkList(Reply):
    """Every sandbox network netd holds."""

    networks: list[NetworkInfo]
