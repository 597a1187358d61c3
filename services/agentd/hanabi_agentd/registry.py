"""The sandboxes agentd serves: one `AgentSession` each, persisted to agent.json.

The registry turns live records into `AgentState` and back, writes agent.json whenever a
session reports a change, and at start-up reads every agent.json back: each sandbox gets a
session with its recorded containers, and the ones whose agent socket still exists are
reconnected in the background (requests for them wait until that attempt ends).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hanabi_common.config import Config
from hanabi_common.errors import HanabiError, NotFound, Unavailable
from hanabi_common.models.agentd import AgentInfo
from hanabi_common.state import StateStore
from hanabi_wire import INIT_EXEC_ID, T_PS

from hanabi_agentd.channel import HybridVsockChannel, UnixChannel, make_channel
from hanabi_agentd.process import ContainerRecord, ProcessRecord
from hanabi_agentd.dns import DnsTarget
from hanabi_agentd.session import AgentSession
from hanabi_agentd.state import STATE_NAME, AgentState, ContainerEntry, ProcessEntry

if TYPE_CHECKING:
    from hanabi_agentd.guest_messages import GuestDnsQuery

log = logging.getLogger("hanabi.agentd")
RECONNECT_TIMEOUT_S = 15.0


@dataclass
class Sandbox:
    """One sandbox's agent as agentd holds it."""

    sandbox_id: str
    address: str
    session: AgentSession
    connected_at: float | None = None
    busy: bool = False
    settled: threading.Event = field(default_factory=threading.Event)

    def info(self) -> AgentInfo:
        """The public view."""
        ping = self.session.info
        return AgentInfo(sandbox_id=self.sandbox_id, connected=self.session.connected,
                         agent_version=ping.agent_version if ping else "",
                         kernel=ping.kernel if ping else "", ready_s=self.session.ready_s)


class Registry:
    """All sandboxes, and their agent.json files."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = StateStore(config.sandboxes_dir)
        self.lock = threading.Lock()
        self._write_lock = threading.Lock()
        self.sandboxes: dict[str, Sandbox] = {}
        self.dns_handler: Callable[[AgentSession, GuestDnsQuery], bool] | None = None  # given to every session: agentd's DnsRelay.submit

    # --- building -----------------------------------------------------------------------
    def new(self, sandbox_id: str, address: str,
            containers: dict[str, ContainerRecord] | None = None) -> Sandbox:
        """A sandbox entry with a (not yet connected) session; not registered yet."""
        make_channel(address)  # validate the address now
        holder: list[Sandbox] = []
        session = AgentSession(sandbox_id, lambda: make_channel(holder[0].address), self.config,
                               on_change=lambda: self.persist(holder[0]), containers=containers)
        session.dns_handler = self.dns_handler
        sandbox = Sandbox(sandbox_id, address, session)
        sandbox.settled.set()
        holder.append(sandbox)
        return sandbox

    def get(self, sandbox_id: str) -> Sandbox:
        """The entry of a sandbox; NotFound if agentd has no agent for it."""
        with self.lock:
            sandbox = self.sandboxes.get(sandbox_id)
        if sandbox is None:
            raise NotFound(f"agentd has no agent for sandbox {sandbox_id}")
        return sandbox

    def live(self, sandbox_id: str) -> AgentSession:
        """The connected session of a sandbox (waits for a reconnect in progress)."""
        sandbox = self.get(sandbox_id)
        sandbox.settled.wait(self.config.agent.request_timeout_s)
        if not sandbox.session.connected:
            why = f" ({sandbox.session.lost_reason})" if sandbox.session.lost_reason else ""
            raise Unavailable(f"the agent of sandbox {sandbox_id} is not connected{why}")
        return sandbox.session

    # --- persistence --------------------------------------------------------------------
    def snapshot(self, sandbox: Sandbox) -> AgentState:
        """The sandbox as agent.json records it."""
        session = sandbox.session
        containers = {}
        with session._lock:
            records = list(session.containers.values())
        for container in records:
            procs = {}
            for record in list(container.processes.values()):
                st = record.state()
                procs[st.exec_id] = ProcessEntry(**st.model_dump())
            containers[container.container_id] = ContainerEntry(container_id=container.container_id,
                                                                processes=procs)
        ping = session.info
        kind = make_channel(sandbox.address).kind
        return AgentState(sandbox_id=sandbox.sandbox_id, address=sandbox.address, channel_kind=kind,
                          agent_version=ping.agent_version if ping else "",
                          kernel=ping.kernel if ping else "", connected_at=sandbox.connected_at,
                          containers=containers,
                          dns_netns=session.dns_target.netns_path if session.dns_target else None,
                          dns_servers=list(session.dns_target.servers) if session.dns_target else [])

    def persist(self, sandbox: Sandbox) -> None:
        """Rewrite agent.json (unless the sandbox was removed meanwhile)."""
        with self._write_lock:
            with self.lock:
                if self.sandboxes.get(sandbox.sandbox_id) is not sandbox:
                    return
            self.store.write(sandbox.sandbox_id, STATE_NAME, self.snapshot(sandbox))

    def remove(self, sandbox_id: str) -> bool:
        """Forget a sandbox and delete its agent.json; True if there was something."""
        with self.lock:
            sandbox = self.sandboxes.pop(sandbox_id, None)
        with self._write_lock:
            existed = sandbox is not None or self.store.path(sandbox_id, STATE_NAME).exists()
            self.store.remove(sandbox_id, STATE_NAME)
        return existed

    # --- restart ------------------------------------------------------------------------
    def restore(self) -> None:
        """Read every agent.json back; reconnect where the agent socket still exists.
        A container deleted while agentd was down is forgotten (vmmd stops its VM)."""
        from hanabi_common import disowned
        disowned.reconcile(self.store, STATE_NAME, lambda sid: None, log)
        for sandbox_id in self.store.list_sandboxes(having=STATE_NAME):
            try:
                state = self.store.read(sandbox_id, STATE_NAME, AgentState)
                if state is None:
                    continue
                sandbox = self.new(sandbox_id, state.address, self._records(state))
            except HanabiError as exc:
                log.error("cannot restore an agent state", extra={"sandbox": sandbox_id,
                                                                   "error": exc.message})
                continue
            sandbox.connected_at = state.connected_at
            if state.dns_netns and state.dns_servers:
                sandbox.session.dns_target = DnsTarget(state.dns_netns, tuple(state.dns_servers))
            with self.lock:
                self.sandboxes[sandbox_id] = sandbox
            if self._reachable(sandbox):
                sandbox.settled.clear()
                sandbox.busy = True
                threading.Thread(target=self._reconnect, args=(sandbox,), daemon=True,
                                 name=f"agentd-restore-{sandbox_id}").start()
            else:
                sandbox.session.lost_reason = "agent socket gone before agentd restarted"
                log.warning("agent socket gone, sandbox kept as disconnected",
                            extra={"sandbox": sandbox_id, "address": state.address})
                self._vm_gone(sandbox)

    def _records(self, state: AgentState) -> dict[str, ContainerRecord]:
        limit = self.config.agent.output_buffer_bytes
        containers = {}
        for cid, entry in state.containers.items():
            procs = {eid: ProcessRecord(cid, eid, limit, status=p.status, pid=p.pid,
                                        exit_code=p.exit_code, signal=p.signal)
                     for eid, p in entry.processes.items()}
            if INIT_EXEC_ID not in procs:
                continue
            container = ContainerRecord(cid, procs[INIT_EXEC_ID])
            container.processes.update(procs)
            containers[cid] = container
        return containers

    @staticmethod
    def _reachable(sandbox: Sandbox) -> bool:
        channel = make_channel(sandbox.address)
        if isinstance(channel, (UnixChannel, HybridVsockChannel)):
            return os.path.exists(channel.path)
        return True

    def _reconnect(self, sandbox: Sandbox) -> None:
        try:
            sandbox.session.connect(min(self.config.agent.ready_timeout_s, RECONNECT_TIMEOUT_S))
            sandbox.connected_at = time.time()
            self.reconcile(sandbox)
            self.persist(sandbox)
        except HanabiError as exc:
            log.warning("could not reconnect to an agent", extra={"sandbox": sandbox.sandbox_id,
                                                                 "error": exc.message})
            if not self._reachable(sandbox):  # the VM died meanwhile
                self._vm_gone(sandbox)
        finally:
            sandbox.busy = False
            sandbox.settled.set()

    def _vm_gone(self, sandbox: Sandbox) -> None:
        """The VM ended while agentd was away (its agent socket is gone): every process
        that was running is recorded killed (status 137), so its stand-in ends and the
        container reads as stopped and can be deleted."""
        from hanabi_agentd.session import LOST_SIGNAL
        changed = False
        for record in sandbox.session.all_processes():
            if record.status != "stopped" and record.mark_exited(None, LOST_SIGNAL):
                changed = True
                log.warning("process ended with its VM while agentd was away", extra={
                    "sandbox": sandbox.sandbox_id, "container": record.container_id, "exec": record.exec_id})
        if changed:
            try:
                self.persist(sandbox)
            except HanabiError as exc:
                log.error("could not record the processes as stopped",
                          extra={"sandbox": sandbox.sandbox_id, "error": exc.message})

    def reconcile(self, sandbox: Sandbox) -> None:
        """After a reconnect: processes recorded running that the guest no longer has
        ended while nobody listened; record them stopped with an unknown status."""
        from hanabi_agentd.guest_messages import GuestMisbehaved, PsResult, parse_result
        session = sandbox.session
        for container in list(session.containers.values()):
            running = [p for p in container.processes.values() if p.status == "running"]
            if not running:
                continue
            try:
                result = parse_result(PsResult, session.request(T_PS, {"container_id": container.container_id}), "ps")
                alive = {p.exec_id for p in result.processes}
            except NotFound:
                alive = set()
            except (HanabiError, GuestMisbehaved) as exc:
                log.warning("could not reconcile a container", extra={
                    "sandbox": sandbox.sandbox_id, "container": container.container_id, "error": str(exc)})
                continue
            for record in running:
                if record.exec_id not in alive and record.mark_exited(None, None):
                    log.warning("process ended while agentd was away; exit status unknown", extra={
                        "sandbox": sandbox.sandbox_id, "container": container.container_id,
                        "exec": record.exec_id})

    def close(self) -> None:
        """Close every session (the guests and their containers keep running)."""
        with self.lock:
            sandboxes = list(self.sandboxes.values())
        for sandbox in sandboxes:
            sandbox.session.close()
