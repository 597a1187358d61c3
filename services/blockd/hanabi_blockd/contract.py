"""blockd's RPC contract: every volume.*, block.* and backend.* method, its models and
whether a retry is harmless.

Drives `BlockService.register` and `BlockdClient` (hanabi_common.rpc.contract).
"""

from __future__ import annotations

from hanabi_common.models.base import Drain, Drained, NoArgs, Removed, SandboxRef
from hanabi_common.models.blockd import (BackendInfo, BlockListing, Collected, CollectBases, ProvisionVolume,
                                         VolumeInfo, VolumeList)
from hanabi_common.rpc.contract import Contract, Rpc


class BLOCKD(Contract):
    """blockd: root filesystems, binds and the shared bases."""

    daemon = "blockd"
    provision = Rpc("volume.provision", ProvisionVolume, VolumeInfo)
    release = Rpc("volume.release", SandboxRef, Removed, idempotent=True)
    drain = Rpc("volume.drain", Drain, Drained, idempotent=True)
    get = Rpc("volume.get", SandboxRef, VolumeInfo, idempotent=True)
    list = Rpc("volume.list", NoArgs, VolumeList, idempotent=True)
    listing = Rpc("block.list", NoArgs, BlockListing, idempotent=True)
    collect = Rpc("block.collect", CollectBases, Collected)
    info = Rpc("backend.info", NoArgs, BackendInfo, idempotent=True)
