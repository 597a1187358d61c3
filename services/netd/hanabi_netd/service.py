"""netd's domain: which network a sandbox gets, and its teardown.

This first version implements `--network none` semantics: the guest gets loopback only,
no tap is made. A netns path may be given (Docker always passes one); it is checked to
be a network namespace, so a bad path is refused before anything is recorded.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from hanabi_common.config import Config
from hanabi_common.errors import AlreadyExists, InvalidArgument, NotFound
from hanabi_common.models.base import NoArgs, Removed, SandboxRef
from hanabi_common.models.netd import AttachNetwork, NetworkInfo, NetworkList
from hanabi_common.rpc.server import RpcServer
from hanabi_common.state import StateStore
from hanabi_netd.state import STATE_NAME, NetworkState

log = logging.getLogger("hanabi.netd")
NSFS_MAGIC = 0x6E736673


def check_netns(path: str) -> None:
    """Raise InvalidArgument unless `path` is a network namespace file (nsfs)."""
    target = Path(path)
    if not target.is_absolute():
        raise InvalidArgument(f"netns path {path!r} must be absolute")
    if not target.exists():
        raise InvalidArgument(f"netns path {path} does not exist")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        link = os.readlink(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    if not link.startswith("net:["):
        raise InvalidArgument(f"{path} is not a network namespace (it is {link!r})")


class NetworkService:
    """Owns the sandbox networks of this host."""

    def __init__(self, config: Config) -> None:
        self.store = StateStore(config.sandboxes_dir)
        self._lock = threading.Lock()

    def register(self, server: RpcServer) -> None:
        """Serve net.attach, net.detach, net.get and net.list."""
        server.register("net.attach", AttachNetwork, self.attach)
        server.register("net.detach", SandboxRef, self.detach)
        server.register("net.get", SandboxRef, self.get)
        server.register("net.list", NoArgs, self.list)

    def close(self) -> None:
        """Nothing held in memory."""

    def attach(self, request: AttachNetwork) -> NetworkInfo:
        """Set up the sandbox's network; the guest gets loopback only for now."""
        if request.netns_path is not None:
            check_netns(request.netns_path)
        with self._lock:
            if self.store.read(request.sandbox_id, STATE_NAME, NetworkState) is not None:
                raise AlreadyExists(f"sandbox {request.sandbox_id} already has a network")
            info = NetworkInfo(sandbox_id=request.sandbox_id, mode="none", netns_path=request.netns_path)
            self.store.write(request.sandbox_id, STATE_NAME, NetworkState(network=info))
        log.info("attached", extra={"sandbox": request.sandbox_id, "mode": info.mode})
        return info

    def detach(self, request: SandboxRef) -> Removed:
        """Tear down the sandbox's network (idempotent)."""
        with self._lock:
            existed = self.store.path(request.sandbox_id, STATE_NAME).exists()
            self.store.remove(request.sandbox_id, STATE_NAME)
        return Removed(existed=existed)

    def get(self, request: SandboxRef) -> NetworkInfo:
        """The network of one sandbox."""
        state = self.store.read(request.sandbox_id, STATE_NAME, NetworkState)
        if state is None:
            raise NotFound(f"sandbox {request.sandbox_id} has no network")
        return state.network

    def list(self, _: object) -> NetworkList:
        """Every sandbox network."""
        result = []
        for sid in self.store.list_sandboxes(having=STATE_NAME):
            state = self.store.read(sid, STATE_NAME, NetworkState)
            if state is not None:
                result.append(state.network)
        return NetworkList(networks=result)
