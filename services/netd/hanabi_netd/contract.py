"""netd's RPC contract: every net.* method, its models and whether a retry is harmless.

Drives `NetService.register` and `NetdClient` (hanabi_common.rpc.contract).
"""

from __future__ import annotations

from hanabi_common.models.base import Drain, Drained, NoArgs, Removed, SandboxRef
from hanabi_common.models.netd import AttachNetwork, ChangesAfter, LinkChanges, NetnsInfo, NetworkInfo, NetworkList
from hanabi_common.rpc.contract import Contract, Rpc


class NETD(Contract):
    """netd: the sandboxes' network namespaces, taps and links."""

    daemon = "netd"
    create_netns = Rpc("net.create_netns", SandboxRef, NetnsInfo)
    attach = Rpc("net.attach", AttachNetwork, NetworkInfo)
    detach = Rpc("net.detach", SandboxRef, Removed, idempotent=True)
    drain = Rpc("net.drain", Drain, Drained, idempotent=True)
    get = Rpc("net.get", SandboxRef, NetworkInfo, idempotent=True)
    list = Rpc("net.list", NoArgs, NetworkList, idempotent=True)
    changes = Rpc("net.changes", ChangesAfter, LinkChanges, idempotent=True)
