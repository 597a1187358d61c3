"""The runtime's handles on the four daemons, made lazily (each CLI call is a fresh process)."""

from __future__ import annotations

from functools import cached_property

from hanabi_common.config import Config


class Daemons:
    """Typed clients of vmmd, netd, blockd and agentd for one configuration."""

    def __init__(self, config: Config) -> None:
        self.config = config

    @cached_property
    def vmmd(self):
        """vmmd's client."""
        from hanabi_vmmd.client import VmmdClient
        return VmmdClient(self.config)

    @cached_property
    def netd(self):
        """netd's client."""
        from hanabi_netd.client import NetdClient
        return NetdClient(self.config)

    @cached_property
    def blockd(self):
        """blockd's client."""
        from hanabi_blockd.client import BlockdClient
        return BlockdClient(self.config)

    @cached_property
    def agentd(self):
        """agentd's client."""
        from hanabi_agentd.client import AgentdClient
        return AgentdClient(self.config)
