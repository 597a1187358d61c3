"""Typed client of netd, used by the runtime."""

from __future__ import annotations

from hanabi_common.config import Config
from hanabi_common.models.base import Drain, Drained, NoArgs, Removed, SandboxRef
from hanabi_common.models.netd import AttachNetwork, ChangesAfter, LinkChanges, NetnsInfo, NetworkInfo, NetworkList
from hanabi_common.rpc.client import RpcClient
from hanabi_common.rpc.contract import ContractClient

from hanabi_netd.contract import NETD


class NetdClient(ContractClient):
    """Calls netd (one method per entry of its table, hanabi_netd.contract)."""

    contract = NETD

    def __init__(self, config: Config, timeout: float | None = None) -> None:
        self.rpc = RpcClient("netd", config.endpoint("netd"), timeout=timeout or config.rpc.default_timeout_s)

    def create_netns(self, sandbox_id: str) -> NetnsInfo:
        """Make an empty network namespace for the sandbox (net.detach removes it)."""
        return self.call(NETD.create_netns, SandboxRef(sandbox_id=sandbox_id))

    def attach(self, sandbox_id: str, netns_path: str | None) -> NetworkInfo:
        """Wire a sandbox into its network namespace."""
        return self.call(NETD.attach, AttachNetwork(sandbox_id=sandbox_id, netns_path=netns_path))

    def detach(self, sandbox_id: str) -> Removed:
        """Tear a sandbox's network down (idempotent)."""
        return self.call(NETD.detach, SandboxRef(sandbox_id=sandbox_id))

    def drain(self, timeout_s: float = 30.0) -> Drained:
        """Wait until the released networks are all removed; the ones still pending."""
        return self.call(NETD.drain, Drain(timeout_s=timeout_s), timeout=timeout_s + 5)

    def get(self, sandbox_id: str) -> NetworkInfo:
        """The network of one sandbox (NotFound if none)."""
        return self.call(NETD.get, SandboxRef(sandbox_id=sandbox_id))

    def changes(self, sandbox_id: str, after: int = 0) -> LinkChanges:
        """Link changes of a running sandbox after number `after` (those up to it are done)."""
        return self.call(NETD.changes, ChangesAfter(sandbox_id=sandbox_id, after=after))

    def list(self) -> NetworkList:
        """Every sandbox network."""
        return self.call(NETD.list, NoArgs())
