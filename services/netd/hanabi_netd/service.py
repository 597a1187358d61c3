"""netd's domain: which network a sandbox gets, and its teardown.

`create_netns` makes an empty namespace for a sandbox whose config asks for a new one
(runc's job under Docker: Docker's prestart hook then moves the endpoint in). `attach`
reads the container's network namespace (the path Docker or the OCI config gives) and
wires each of its ethernet links to a tap of its own with tc redirects (see `tcfilter`,
`topology`). A namespace with loopback only (`--network none`), or no
namespace at all, gets mode "none": the guest has loopback only. What was planned is
written to `network.json` before anything is made, so a netd killed half-way, or
restarted while containers run, still knows what to remove; `detach` removes the taps
and qdiscs and leaves the namespace's links as Docker made them. A namespace that is
gone (Docker deletes it when the container stops) took its taps with it; one netd made
is unpinned by `detach` (and dies with its last user, the VM's tap fds). `detach` itself
only moves network.json into netd's release queue (hanabi_common.releasing): the taps,
qdiscs and namespace go in the background, or at netd's next start.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from pathlib import Path

from hanabi_common.config import Config
from hanabi_common.errors import AlreadyExists, FailedPrecondition, HanabiError, NotFound
from hanabi_common.metrics import Gauges, LabelledGauge
from hanabi_common import disowned
from hanabi_common.models.base import Drain, Drained, Removed, SandboxRef
from hanabi_common.models.netd import AttachNetwork, ChangesAfter, LinkChanges, NetnsInfo, NetworkInfo, NetworkList
from hanabi_common.netns import check_netns, create_netns, remove_netns
from hanabi_common.releasing import Releases
from hanabi_common.rpc.server import RpcServer
from hanabi_common.state import StateStore
from hanabi_netd.contract import NETD
from hanabi_netd.state import STATE_NAME, NetworkState
from hanabi_netd.topology import plan_change
from hanabi_netd.watch import NetnsWatcher

log = logging.getLogger("hanabi.netd")


def _same_netns(info: NetworkInfo) -> bool:
    """True when the recorded namespace path still names the namespace we wired."""
    if info.netns_path is None:
        return False
    try:
        check_netns(info.netns_path)
        return info.netns_inode is None or os.stat(info.netns_path).st_ino == info.netns_inode
    except Exception:  # noqa: BLE001 - gone, unmounted or replaced: nothing of ours is there
        return False


def orphan_netns(entries: list[str], claimed: set[str]) -> list[str]:
    """The namespace files of netd's directory that no network.json names (pure)."""
    return sorted(e for e in entries if e not in claimed)


class NetworkService:
    """Owns the sandbox networks of this host."""

    def __init__(self, config: Config, *, watch: bool = True) -> None:
        self.config = config
        self.store = StateStore(config.sandboxes_dir)
        self.netns_dir = config.run_dir / "netns"
        self._lock = threading.Lock()
        self._watch = watch
        self._watchers: dict[str, NetnsWatcher] = {}
        self.releases = Releases(config.run_dir, "netd", self._finish_release, log)
        self.releases.finish_all()  # what a crash left between a detach and its cleanup
        for sid in self.store.list_sandboxes(having=STATE_NAME):  # a restart watches again
            state = self.store.read(sid, STATE_NAME, NetworkState)
            if state is not None and state.network is not None and _same_netns(state.network):
                self._start_watching(sid, state.network.netns_path)
        # Containers deleted while netd was down: their taps and namespaces go now.
        disowned.reconcile(self.store, STATE_NAME, lambda sid: self.detach(SandboxRef(sandbox_id=sid)), log)
        self._sweep_netns()
        self.releases.start()

    def _sweep_netns(self) -> None:
        """Unpin the namespaces netd made that no network.json claims any more (a crash
        between making one and recording it, or a state directory removed by hand)."""
        if not self.netns_dir.is_dir():
            return
        claimed = set()
        for sid in self.store.list_sandboxes(having=STATE_NAME):
            try:
                state = self.store.read(sid, STATE_NAME, NetworkState)
            except HanabiError:
                return  # cannot tell what is claimed: touch nothing
            if state is not None:
                claimed |= {p for p in (state.owned_netns, state.network.netns_path if state.network else None) if p}
        for sid in self.releases.pending():  # the release worker removes those
            claimed.add(self.netns_path_for(sid))
        entries = [str(self.netns_dir / name) for name in os.listdir(self.netns_dir)]
        for path in orphan_netns(entries, claimed):
            try:
                remove_netns(path)
                log.warning("removed a network namespace no sandbox owns", extra={"path": path})
            except OSError as exc:
                log.error("cannot remove an orphaned network namespace", extra={"path": path, "error": str(exc)})

    def register(self, server: RpcServer) -> None:
        """Serve the net.* methods (the table in hanabi_netd.contract)."""
        NETD.register(server, self)

    def close(self) -> None:
        """Stop watching namespaces; the taps stay with their sandboxes."""
        for watcher in list(self._watchers.values()):
            watcher.stop()
        self._watchers.clear()
        self.releases.close()

    # -- watching (docker network connect / disconnect) ---------------------------------

    def _start_watching(self, sid: str, netns_path: str | None) -> None:
        if not self._watch or netns_path is None or sid in self._watchers:
            return
        watcher = NetnsWatcher(sid, netns_path, lambda: self.reconcile(sid))
        try:
            watcher.start()
        except Exception as exc:  # noqa: BLE001 - the container still works without it
            log.warning("cannot watch the namespace", extra={"sandbox": sid, "error": str(exc)})
            watcher.stop()
            return
        self._watchers[sid] = watcher

    def _stop_watching(self, sid: str) -> None:
        watcher = self._watchers.pop(sid, None)
        if watcher is not None:
            watcher.stop()

    def reconcile(self, sid: str) -> None:
        """Bring the wiring in line with the namespace: wire links that appeared, unwire the
        ones that vanished, and record each as a LinkChange for the orchestrator (the
        runtime's stand-in, hanabi_runtime.netfollow), which plugs or unplugs the VM's NIC
        and configures the guest: netd calls no other daemon."""
        from hanabi_common.models.netd import LinkChange
        from hanabi_netd import tcfilter

        state = self.store.read(sid, STATE_NAME, NetworkState)
        if state is None or state.network is None or not _same_netns(state.network):
            return
        info = state.network
        change = tcfilter.with_ipr(info.netns_path, lambda ipr: plan_change(*tcfilter.snapshot(ipr), info.interfaces))
        for interface in change.removed:
            tcfilter.with_ipr(info.netns_path, lambda ipr, i=interface: tcfilter.unwire(ipr, i.link, i.tap))
            info.interfaces = [i for i in info.interfaces if i.tap != interface.tap]
            info.routes = [r for r in info.routes if r.dev != interface.name]
            state.change_seq += 1
            state.changes.append(LinkChange(seq=state.change_seq, kind="removed", interface=interface))
            self._save(sid, state)
            self._ring(sid)
            log.info("interface gone", extra={"sandbox": sid, "link": interface.link, "tap": interface.tap})
        for wiring in change.added:
            tcfilter.with_ipr(info.netns_path,
                              lambda ipr, w=wiring: tcfilter.wire(ipr, w.link.name, w.tap, w.link.mtu))
            routes = [r for r in change.routes if r.dev == wiring.interface.name]
            info.interfaces.append(wiring.interface)
            info.routes.extend(routes)
            state.change_seq += 1
            state.changes.append(LinkChange(seq=state.change_seq, kind="added", interface=wiring.interface,
                                            routes=routes))
            self._save(sid, state)
            self._ring(sid)
            log.info("interface added", extra={"sandbox": sid, "link": wiring.link.name, "tap": wiring.tap})

    def _ring(self, sid: str) -> None:
        """Tell the sandbox's stand-in (hanabi_runtime.netfollow) to look at its changes: its
        doorbell, a FIFO in the sandbox's directory (never blocks; nobody there is fine)."""
        from hanabi_common.doorbell import NET_CHANGES_BELL, ring

        ring(self.store.sandbox_dir(sid) / NET_CHANGES_BELL)

    def changes(self, request: ChangesAfter) -> LinkChanges:
        """The link changes after `request.after`; the ones up to it are applied, forgotten."""
        with self._lock:
            state = self.store.read(request.sandbox_id, STATE_NAME, NetworkState)
            if state is None:
                raise NotFound(f"sandbox {request.sandbox_id} has no network")
            state.changes_done = max(state.changes_done, request.after)
            pending = [c for c in state.changes if c.seq > state.changes_done]
            if len(pending) != len(state.changes):
                state.changes = pending
                self.store.write(request.sandbox_id, STATE_NAME, state)
        return LinkChanges(netns_path=state.network.netns_path if state.network else None, changes=pending)

    def _save(self, sid: str, state: NetworkState) -> None:
        with self._lock:
            current = self.store.read(sid, STATE_NAME, NetworkState)
            if current is not None:  # not detached meanwhile
                # net.changes may have marked some done since `state` was read.
                state.changes_done = max(state.changes_done, current.changes_done)
                state.changes = [c for c in state.changes if c.seq > state.changes_done]
                self.store.write(sid, STATE_NAME, state)

    def metrics(self) -> Gauges:
        """Gauges for Prometheus: networks by mode, taps, watched namespaces."""
        networks = self.list(None).networks
        modes = {"none": 0, "tcfilter": 0}
        for network in networks:
            modes[network.mode] = modes.get(network.mode, 0) + 1
        return {
            "hanabi_networks": ("Sandbox networks by mode", LabelledGauge("mode", modes)),
            "hanabi_network_taps": ("Taps wired to container links", sum(len(n.interfaces) for n in networks)),
            "hanabi_network_watched_namespaces": ("Namespaces watched for connect/disconnect", len(self._watchers)),
            "hanabi_network_releases_pending": ("Released networks whose cleanup is not finished",
                                                len(self.releases.pending())),
        }

    def netns_path_for(self, sandbox_id: str) -> str:
        """Where the namespace netd makes for a sandbox is pinned (short: ids may be long)."""
        digest = hashlib.sha256(sandbox_id.encode()).hexdigest()[:16]
        return str(self.netns_dir / digest)

    def create_netns(self, request: SandboxRef) -> NetnsInfo:
        """Make an empty network namespace for a sandbox whose config asks for a new one
        (Docker's hooks then put its endpoint there, before `attach` reads it)."""
        sid = request.sandbox_id
        with self._lock:
            self.releases.finish(sid)  # an earlier sandbox of this id: same namespace path
            state = self.store.read(sid, STATE_NAME, NetworkState)
            if state is not None:
                raise AlreadyExists(f"sandbox {sid} already has a network namespace or network")
            path = self.netns_path_for(sid)
            remove_netns(path)  # a leftover of a crash: no state file refers to it
            self.store.write(sid, STATE_NAME, NetworkState(owned_netns=path))  # intent first
            try:
                create_netns(path)
            except OSError as exc:
                self.store.remove(sid, STATE_NAME)
                raise FailedPrecondition(f"cannot create a network namespace: {exc}") from None
        log.info("netns created", extra={"sandbox": sid, "path": path})
        return NetnsInfo(sandbox_id=sid, path=path)

    def attach(self, request: AttachNetwork) -> NetworkInfo:
        """Wire the sandbox's namespace for its VM; loopback-only namespaces get mode none."""
        from hanabi_netd import tcfilter, topology

        sid, path = request.sandbox_id, request.netns_path
        began = time.monotonic()
        with self._lock:
            self.releases.finish(sid)
            existing = self.store.read(sid, STATE_NAME, NetworkState)
            if existing is not None and existing.network is not None:
                raise AlreadyExists(f"sandbox {sid} already has a network")
            owned = existing.owned_netns if existing is not None else None
            if path is None:
                info = NetworkInfo(sandbox_id=sid, mode="none")
                self.store.write(sid, STATE_NAME, NetworkState(owned_netns=owned, network=info))
                return info
            check_netns(path)
            inode = os.stat(path).st_ino
            if inode == os.stat("/proc/self/ns/net").st_ino:
                raise FailedPrecondition(
                    f"{path} is the host's network namespace: its links cannot be handed to a VM "
                    "(a container without a network namespace in its config gets loopback only)")

            def wire_all(ipr) -> NetworkInfo:
                plan = topology.plan_network(*tcfilter.snapshot(ipr))
                info = NetworkInfo(sandbox_id=sid, mode="tcfilter" if plan.wirings else "none",
                                   netns_path=path, netns_inode=inode,
                                   interfaces=[w.interface for w in plan.wirings], routes=plan.routes)
                self.store.write(sid, STATE_NAME, NetworkState(owned_netns=owned, network=info))  # intent first
                done = []
                try:
                    for wiring in plan.wirings:
                        tcfilter.wire(ipr, wiring.link.name, wiring.tap, wiring.link.mtu)
                        done.append(wiring)
                except BaseException:
                    for wiring in reversed(done):
                        tcfilter.unwire(ipr, wiring.link.name, wiring.tap)
                    self.store.write(sid, STATE_NAME, NetworkState(owned_netns=owned))
                    raise
                return info

            info = tcfilter.with_ipr(path, wire_all)
            info.attach_ms = round((time.monotonic() - began) * 1000, 1)
            self.store.write(sid, STATE_NAME, NetworkState(owned_netns=owned, network=info))
        self._start_watching(sid, path)
        log.info("attached", extra={"sandbox": sid, "mode": info.mode, "ms": info.attach_ms,
                                    "taps": [i.tap for i in info.interfaces]})
        return info

    def detach(self, request: SandboxRef) -> Removed:
        """Release the sandbox's network (idempotent): network.json moves into the release
        queue at once; the taps, qdiscs and the namespace netd made go in the background
        (`_finish_release`). The namespace's own links stay as they were."""
        sid = request.sandbox_id
        self._stop_watching(sid)  # first: a change in progress finishes (it takes the lock)
        with self._lock:
            record = self.releases.take(self.store.path(sid, STATE_NAME), sid)
            self.store.remove_dir_if_empty(sid)
        if record is None:
            return Removed(existed=self.releases.record_path(sid).exists())
        self.releases.wake()
        return Removed(existed=True)

    def _finish_release(self, sid: str, record: Path) -> None:
        """Remove what a released sandbox's record names (the queue's worker; no lock of ours)."""
        from hanabi_netd import tcfilter

        state = NetworkState.model_validate_json(record.read_bytes())
        info = state.network
        if info is not None and info.interfaces and _same_netns(info):
            def unwire_all(ipr) -> None:
                for interface in info.interfaces:
                    tcfilter.unwire(ipr, interface.link, interface.tap)

            tcfilter.with_ipr(info.netns_path, unwire_all)
        if state.owned_netns is not None:
            try:
                remove_netns(state.owned_netns)
            except OSError as exc:
                raise FailedPrecondition(f"cannot remove network namespace {state.owned_netns}: {exc}") from None
        log.info("detached", extra={"sandbox": sid, "taps": [i.tap for i in info.interfaces] if info else [],
                                    "netns_removed": state.owned_netns})

    def drain(self, request: Drain) -> Drained:
        """Wait until the released networks are all removed (or the timeout passed)."""
        return Drained(pending=self.releases.drain(request.timeout_s))

    def get(self, request: SandboxRef) -> NetworkInfo:
        """The network of one sandbox."""
        state = self.store.read(request.sandbox_id, STATE_NAME, NetworkState)
        if state is None or state.network is None:
            raise NotFound(f"sandbox {request.sandbox_id} has no network")
        return state.network

    def list(self, _: object) -> NetworkList:
        """Every sandbox network."""
        result = []
        for sid in self.store.list_sandboxes(having=STATE_NAME):
            state = self.store.read(sid, STATE_NAME, NetworkState)
            if state is not None and state.network is not None:
                result.append(state.network)
        return NetworkList(networks=result)
