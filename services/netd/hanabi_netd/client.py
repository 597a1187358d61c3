"""Typed client of netd, used by the runtime."""

from __future__ import annotations

from hanabi_common.config import Config
from hanabi_common.models.base import Removed, SandboxRef
from hanabi_common.models.netd import AttachNetwork, NetnsInfo, NetworkInfo, NetworkList
from hanabi_common.rpc.client import RpcClient


class NetdClient:
    """Calls netd."""

    def __init__(self, config: Config, timeout: float | None = None) -> None:
        self.rpc = RpcClient("netd", config.endpoint("netd"), timeout=timeout or config.rpc.default_timeout_s)

    def create_netns(self, sandbox_id: str) -> NetnsInfo:
        """Make an empty network namespace for the sandbox (net.detach removes it)."""
        return self.rpc.call("net.create_netns", SandboxRef(sandbox_id=sandbox_id), NetnsInfo)

    def attach(self, sandbox_id: str, netns_path: str | None) -> NetworkInfo:
        """Wire a sandbox into its network namespace."""
        return self.rpc.call("net.attach", AttachNetwork(sandbox_id=sandbox_id, netns_path=netns_path), NetworkInfo)

    def detach(self, sandbox_id: str) -> Removed:
        """Tear a sandbox's network down (idempotent)."""
        return self.rpc.call("net.detach", SandboxRef(sandbox_id=sandbox_id), Removed, idempotent=True)

    def list(self) -> NetworkList:
        """Every sandbox network."""
        return self.rpc.call("net.list", {}, NetworkList, idempotent=True)
