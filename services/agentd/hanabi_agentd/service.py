"""agentd's RPC surface: agents (connect, get, list, inspect, disconnect) and containers
(create, start, exec, signal, close_stdin, resize, state, ps, destroy) inside the guest.

Every call names a sandbox; its `AgentSession` does the talking. Process records are
created before the guest can mention them (so early output is buffered, not dropped) and
agent.json is rewritten when a process starts, exits or a container goes away. The io
socket (`io_server`) is started with the service; at start-up every agent.json is read
back and the agents still reachable are reconnected.
"""

from __future__ import annotations

import logging
import signal as signals
import time

from hanabi_common.config import Config
from hanabi_common.errors import (AlreadyExists, FailedPrecondition, HanabiError, Internal,
                                  InvalidArgument, NotFound)
from hanabi_common.models.agentd import (AgentInfo, ConfigureNetwork, ConnectAgent, ContainerRef, ContainerState,
                                         CreateContainer, ExecProcess, GuestProcess, ProcessList,
                                         SignalProcess, StartedProcess)
from hanabi_common.metrics import Gauges, LabelledGauge
from hanabi_common.models.base import NoArgs, Removed, SandboxRef
from hanabi_common.rpc.server import RpcServer
from hanabi_wire import (INIT_EXEC_ID, T_CLOSE_STDIN, T_CONFIGURE_NETWORK, T_CREATE_CONTAINER,
                         T_DESTROY_CONTAINER, T_EXEC, T_PS, T_RESIZE, T_SHUTDOWN, T_SIGNAL, T_START, T_SYNC_FS,
                         WireError)
from hanabi_wire import request as wire_request

from hanabi_agentd.channel import address_for
from hanabi_agentd.contract import AGENTD
from hanabi_agentd.dns import DnsRelay, DnsTarget
from hanabi_agentd.guest_messages import GuestMisbehaved, PidResult, PsResult, parse_result
from hanabi_agentd.io_server import IoServer, io_socket_path
from hanabi_agentd.models import AgentDetails, AgentList, ProcessRef, ResizeProcess
from hanabi_agentd.process import ContainerRecord, ProcessRecord
from hanabi_agentd.registry import Registry, Sandbox
from hanabi_agentd.session import LOST_SIGNAL, AgentSession

log = logging.getLogger("hanabi.agentd")
SHUTDOWN_TIMEOUT_S = 5.0
# How long `release` waits for the guest to flush what still-running processes wrote.
SYNC_TIMEOUT_S = 5.0


def guest_request(kind: str, **fields) -> dict:
    """A request for the guest, checked against its definition (hanabi_wire.messages)."""
    try:
        return wire_request(kind, **fields)
    except WireError as exc:
        raise InvalidArgument(f"cannot send {kind} to the guest: {exc}") from None


def resize_fields(record: ProcessRecord, height: int, width: int) -> dict:
    """The fields of the guest's `resize` request for one process."""
    return guest_request(T_RESIZE, container_id=record.container_id, exec_id=record.exec_id,
                         height=height, width=width)


def _result(model, result: dict, what: str):
    try:
        return parse_result(model, result, what)
    except GuestMisbehaved as exc:
        raise Internal(f"guest agent: {exc}") from None


class AgentService:
    """Relays between the runtime and the agents of this host's sandboxes."""

    def __init__(self, config: Config, *, restore: bool = True) -> None:
        self.config = config
        self.registry = Registry(config)
        self.dns = DnsRelay()
        self.registry.dns_handler = self.dns.submit
        if restore:
            # Before the io socket opens: a stand-in re-attaching after a restart must find
            # its sandbox known (an attach to an unknown one is refused for good).
            self.registry.restore()
        self.io = IoServer(io_socket_path(config.run_dir), self._resolve_io)
        self.io.start()

    def register(self, server: RpcServer) -> None:
        """Serve the agent.* and container.* methods (the table in hanabi_agentd.contract)."""
        AGENTD.register(server, self)

    def metrics(self) -> Gauges:
        """Gauges for Prometheus: agents by connection, processes by status, DNS relay totals."""
        with self.registry.lock:
            sandboxes = list(self.registry.sandboxes.values())
        connected = sum(s.session.connected for s in sandboxes)
        statuses: dict[str, int] = {}
        for sandbox in sandboxes:
            for record in sandbox.session.all_processes():
                statuses[record.status] = statuses.get(record.status, 0) + 1
        return {
            "hanabi_agents": ("Guest agents by connection", LabelledGauge(
                "connected", {"true": connected, "false": len(sandboxes) - connected})),
            "hanabi_guest_processes": ("Container processes by status", LabelledGauge("status", statuses)),
            "hanabi_dns_relay_queries": ("Guest DNS queries relayed since start, by result",
                                         LabelledGauge("result", {k: self.dns.counts.get(k, 0)
                                                                  for k in ("answered", "unanswered", "dropped")})),
        }

    def close(self) -> None:
        """Stop the io socket and close every agent connection (guests keep running)."""
        self.io.stop()
        self.dns.close()
        self.registry.close()

    def _resolve_io(self, sandbox_id: str, container_id: str, exec_id: str) -> tuple[AgentSession, ProcessRecord]:
        sandbox = self.registry.get(sandbox_id)
        # A reconnect in progress (agentd restarted): answer once it ended, so the client
        # finds the session as the guest left it.
        sandbox.settled.wait(self.config.agent.request_timeout_s)
        session = sandbox.session
        return session, session.process(container_id, exec_id)

    # --- agents ---------------------------------------------------------------------------
    def connect(self, request: ConnectAgent) -> AgentInfo:
        """Connect to a sandbox's agent socket and wait until the agent answers ping."""
        sid = request.sandbox_id
        if not request.socket_path.startswith(("/", "unix://", "hvsock://", "vsock://")):
            raise InvalidArgument(f"agent address {request.socket_path[:200]!r} must be absolute")
        address = address_for(request.socket_path, request.transport, request.port)
        with self.registry.lock:
            sandbox = self.registry.sandboxes.get(sid)
            if sandbox is not None and (sandbox.busy or sandbox.session.connected):
                raise AlreadyExists(f"sandbox {sid} is already connected to its agent")
            fresh = sandbox is None
            if sandbox is None:
                sandbox = self.registry.new(sid, address)
                self.registry.sandboxes[sid] = sandbox
            else:
                sandbox.address = address
            sandbox.busy = True
        try:
            sandbox.session.connect(request.timeout_s)
        except BaseException:
            if fresh:
                with self.registry.lock:
                    if self.registry.sandboxes.get(sid) is sandbox:
                        del self.registry.sandboxes[sid]
            raise
        finally:
            sandbox.busy = False
        sandbox.connected_at = time.time()
        if not fresh:
            self.registry.reconcile(sandbox)
        self.registry.persist(sandbox)
        return sandbox.info()

    def get(self, request: SandboxRef) -> AgentInfo:
        """The agent of one sandbox."""
        return self.registry.get(request.sandbox_id).info()

    def list(self, _: NoArgs) -> AgentList:
        """Every agent agentd knows."""
        with self.registry.lock:
            sandboxes = sorted(self.registry.sandboxes.values(), key=lambda s: s.sandbox_id)
        return AgentList(agents=[s.info() for s in sandboxes])

    def inspect(self, request: SandboxRef) -> AgentDetails:
        """Everything agentd knows of one sandbox's agent."""
        sandbox = self.registry.get(request.sandbox_id)
        state = self.registry.snapshot(sandbox)
        return AgentDetails(agent=sandbox.info(), address=state.address, channel_kind=state.channel_kind,
                            lost_reason=sandbox.session.lost_reason,
                            containers=state.model_dump(mode="json")["containers"])

    def disconnect(self, request: SandboxRef) -> Removed:
        """Ask the guest to shut down (failure ignored), close, forget (idempotent)."""
        with self.registry.lock:
            sandbox = self.registry.sandboxes.get(request.sandbox_id)
        if sandbox is not None:
            session = sandbox.session
            if session.connected:
                try:
                    session.request(T_SHUTDOWN, guest_request(T_SHUTDOWN), timeout=SHUTDOWN_TIMEOUT_S)
                except HanabiError as exc:
                    log.info("guest did not acknowledge shutdown", extra={
                        "sandbox": request.sandbox_id, "error": exc.message})
            session.close()
            for record in session.all_processes():
                record.mark_exited(None, LOST_SIGNAL)  # the VM goes down with them
        return Removed(existed=self.registry.remove(request.sandbox_id))

    def release(self, request: SandboxRef) -> Removed:
        """A container's delete, whose VM vmmd kills next: no word to the guest but, while
        processes still run, a sync (bounded by SYNC_TIMEOUT_S). Its processes still running
        count as SIGKILLed (their stand-ins exit 137, as runc's `delete --force`), the
        connection is closed, the sandbox forgotten (idempotent)."""
        with self.registry.lock:
            sandbox = self.registry.sandboxes.get(request.sandbox_id)
        if sandbox is not None:
            running = [r for r in sandbox.session.all_processes() if r.status == "running"]
            if running and sandbox.session.connected:
                # As under runc, what a killed process wrote is kept: the guest flushes it
                # (processes that exited were flushed by the guest before their exit).
                try:
                    sandbox.session.request(T_SYNC_FS, guest_request(T_SYNC_FS), timeout=SYNC_TIMEOUT_S)
                except HanabiError as exc:
                    log.warning("the guest did not flush its filesystems before its VM is killed", extra={
                        "sandbox": request.sandbox_id, "error": exc.message})
            for record in running:
                record.mark_exited(None, int(signals.SIGKILL))
            sandbox.session.close()
            for record in sandbox.session.all_processes():
                record.mark_exited(None, LOST_SIGNAL)  # created, never started: gone with the VM
        return Removed(existed=self.registry.remove(request.sandbox_id))

    def configure_network(self, request: ConfigureNetwork) -> dict:
        """Have the guest bring up loopback and its NICs, addresses and routes, and relay
        its queries to the loopback resolvers of the container's namespace (Docker's
        embedded DNS) when there are any."""
        session = self.registry.live(request.sandbox_id)
        if request.dns_relay and request.dns_netns:
            session.dns_target = DnsTarget(request.dns_netns, tuple(request.dns_relay))
        fields = request.model_dump(mode="json", exclude={"sandbox_id", "dns_netns"})
        session.request(T_CONFIGURE_NETWORK, guest_request(T_CONFIGURE_NETWORK, **fields))
        self._persist(request.sandbox_id)
        return {}

    # --- containers -----------------------------------------------------------------------
    def create(self, request: CreateContainer) -> dict:
        """Create a container in the guest (mounts its disk; the process is not started)."""
        session = self.registry.live(request.sandbox_id)
        cid = request.container_id
        record = ContainerRecord(cid, session.new_process(cid, INIT_EXEC_ID))
        # The guest takes the request's own fields (docs/agent-protocol.md), less the sandbox.
        fields = guest_request(T_CREATE_CONTAINER, **request.model_dump(mode="json", exclude={"sandbox_id"}))
        with session._lock:
            if cid in session.containers:
                raise AlreadyExists(f"container {cid} already exists in sandbox {request.sandbox_id}")
            session.containers[cid] = record
        try:
            session.request(T_CREATE_CONTAINER, fields)
        except BaseException:
            with session._lock:
                if session.containers.get(cid) is record:
                    del session.containers[cid]
            raise
        self._persist(request.sandbox_id)
        return {}

    def start(self, request: ContainerRef) -> StartedProcess:
        """Start a created container's init process."""
        session = self.registry.live(request.sandbox_id)
        record = session.process(request.container_id, INIT_EXEC_ID)
        if record.status != "created":
            raise FailedPrecondition(f"container {request.container_id} is {record.status}, not created")
        result = _result(PidResult, session.request(T_START, guest_request(
            T_START, container_id=request.container_id)), "start")
        record.mark_running(result.pid)
        self._persist(request.sandbox_id)
        return StartedProcess(pid=result.pid)

    def exec(self, request: ExecProcess) -> StartedProcess:
        """Start one more process in a running container."""
        session = self.registry.live(request.sandbox_id)
        cid, eid = request.container_id, request.exec_id
        if eid == INIT_EXEC_ID:
            raise InvalidArgument("exec id 'init' is reserved for the container's first process")
        container = session.container(cid)
        if container.init.status != "running":
            raise FailedPrecondition(f"container {cid} is {container.init.status}, not running")
        record = session.new_process(cid, eid)
        with session._lock:
            old = container.processes.get(eid)
            if old is not None and old.status != "stopped":
                raise AlreadyExists(f"container {cid} already has a process {eid}")
            container.processes[eid] = record
        try:
            reply = session.request(T_EXEC, guest_request(T_EXEC, container_id=cid, exec_id=eid,
                                                          process=request.process))
            result = _result(PidResult, reply, "exec")
        except BaseException:
            with session._lock:
                if container.processes.get(eid) is record:
                    del container.processes[eid]
            raise
        record.mark_running(result.pid)
        self._persist(request.sandbox_id)
        return StartedProcess(pid=result.pid)

    def signal(self, request: SignalProcess) -> dict:
        """Send a signal to one process of a container (or to all of them)."""
        session = self.registry.live(request.sandbox_id)
        record = session.process(request.container_id, request.exec_id)
        if record.status == "stopped" and not request.all:
            raise FailedPrecondition(f"process {request.container_id}/{request.exec_id} is not running")
        session.request(T_SIGNAL, guest_request(T_SIGNAL, container_id=request.container_id,
                                                exec_id=request.exec_id, signal=request.signal, all=request.all))
        return {}

    def close_stdin(self, request: ProcessRef) -> dict:
        """Close a process's stdin (its io client usually does this instead)."""
        session = self.registry.live(request.sandbox_id)
        session.process(request.container_id, request.exec_id)
        session.request(T_CLOSE_STDIN, guest_request(T_CLOSE_STDIN, container_id=request.container_id,
                                                     exec_id=request.exec_id))
        return {}

    def resize(self, request: ResizeProcess) -> dict:
        """Set the window size of a process's terminal (its io client usually does this)."""
        session = self.registry.live(request.sandbox_id)
        record = session.process(request.container_id, request.exec_id)
        if record.status != "running":
            raise FailedPrecondition(f"process {request.container_id}/{request.exec_id} is {record.status}, "
                                     "not running")
        session.request(T_RESIZE, resize_fields(record, request.height, request.width))
        return {}

    def state(self, request: ContainerRef) -> ContainerState:
        """Status of a container's init process and of all its processes (works after exit)."""
        session = self.registry.get(request.sandbox_id).session
        return session.container(request.container_id).state(request.sandbox_id)

    def ps(self, request: ContainerRef) -> ProcessList:
        """The container's processes as the guest sees them."""
        session = self.registry.live(request.sandbox_id)
        session.container(request.container_id)
        result = _result(PsResult, session.request(T_PS, guest_request(T_PS, container_id=request.container_id)),
                         "ps")
        return ProcessList(processes=[GuestProcess(pid=p.pid, exec_id=p.exec_id, args=list(p.args))
                                      for p in result.processes])

    def destroy(self, request: ContainerRef) -> Removed:
        """Kill every process of a container, unmount it, forget it (idempotent)."""
        try:
            sandbox: Sandbox | None = self.registry.get(request.sandbox_id)
        except NotFound:
            sandbox = None
        if sandbox is None:
            return Removed(existed=False)
        session = sandbox.session
        cid = request.container_id
        with session._lock:
            container = session.containers.get(cid)
        existed = container is not None
        sandbox.settled.wait(self.config.agent.request_timeout_s)
        if session.connected:
            try:
                session.request(T_DESTROY_CONTAINER, guest_request(T_DESTROY_CONTAINER, container_id=cid))
                existed = True
            except NotFound:
                pass
        if container is not None:
            for record in list(container.processes.values()):
                killed = int(signals.SIGKILL) if record.status == "running" else None
                record.mark_exited(None, killed)
            with session._lock:
                if session.containers.get(cid) is container:
                    del session.containers[cid]
            self._persist(request.sandbox_id)
        return Removed(existed=existed)

    def _persist(self, sandbox_id: str) -> None:
        try:
            sandbox = self.registry.get(sandbox_id)
        except NotFound:
            return
        self.registry.persist(sandbox)

