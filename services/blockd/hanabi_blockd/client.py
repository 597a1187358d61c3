"""Typed client of blockd, used by the runtime."""

from __future__ import annotations

from collections.abc import Sequence

from hanabi_common.config import Config
from hanabi_common.models.base import Drain, Drained, NoArgs, Removed, SandboxRef
from hanabi_common.models.blockd import (BackendInfo, BindSource, BlockListing, Collected, CollectBases, ProvisionVolume,
                                         VolumeInfo, VolumeList)
from hanabi_common.rpc.client import RpcClient
from hanabi_common.rpc.contract import ContractClient

from hanabi_blockd.contract import BLOCKD


class BlockdClient(ContractClient):
    """Calls blockd (one method per entry of its table, hanabi_blockd.contract)."""

    contract = BLOCKD

    def __init__(self, config: Config, timeout: float | None = None) -> None:
        self.rpc = RpcClient("blockd", config.endpoint("blockd"), timeout=timeout or max(config.rpc.default_timeout_s, 120))

    def provision(self, sandbox_id: str, rootfs: str, readonly: bool = False,
                  binds: Sequence[tuple[str, str, bool]] = (), formats: list[str] | None = None,
                  share_root: str | None = None, container_id: str | None = None) -> VolumeInfo:
        """Give the sandbox its root filesystem and binds (name, source, read-only): with
        `share_root` (the VM's export root) bind-mounted live into it, else as a root
        volume and a binds disk; `formats`: the disk formats the VM opens, preferred first
        (["raw"] for Firecracker)."""
        request = ProvisionVolume(sandbox_id=sandbox_id, rootfs=rootfs, readonly=readonly,
                                  binds=[BindSource(name=n, source=s, readonly=ro) for n, s, ro in binds],
                                  share_root=share_root, container_id=container_id,
                                  **({"formats": formats} if formats else {}))
        return self.call(BLOCKD.provision, request)

    def release(self, sandbox_id: str) -> Removed:
        """Remove the sandbox's volumes (idempotent)."""
        return self.call(BLOCKD.release, SandboxRef(sandbox_id=sandbox_id))

    def drain(self, timeout_s: float = 30.0) -> Drained:
        """Wait until the released volumes are all removed; the ones still pending."""
        return self.call(BLOCKD.drain, Drain(timeout_s=timeout_s), timeout=timeout_s + 5)

    def get(self, sandbox_id: str) -> VolumeInfo:
        """The volumes of one sandbox (NotFound if none)."""
        return self.call(BLOCKD.get, SandboxRef(sandbox_id=sandbox_id))

    def list(self) -> VolumeList:
        """Every volume."""
        return self.call(BLOCKD.list, NoArgs())

    def listing(self) -> BlockListing:
        """Pools, bases with their holders, volumes."""
        return self.call(BLOCKD.listing, NoArgs())

    def info(self) -> BackendInfo:
        """Which backend blockd uses, and why."""
        return self.call(BLOCKD.info, NoArgs())

    def collect(self, budget_mib: int | None = None) -> Collected:
        """Collect unused bases beyond the budget (or `budget_mib`)."""
        return self.call(BLOCKD.collect, CollectBases(budget_mib=budget_mib))
