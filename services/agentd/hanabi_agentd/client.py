"""Typed client of agentd, used by the runtime CLI (and the ctl commands)."""

from __future__ import annotations

from typing import Any

from hanabi_common.config import Config
from hanabi_common.models.agentd import (AgentInfo, ConfigureNetwork, ConnectAgent, ContainerRef, ContainerState,
                                         CreateContainer, ExecProcess, ProcessList, RootfsSpec,
                                         SignalProcess, StartedProcess)
from hanabi_common.models.base import NoArgs, Removed, SandboxRef
from hanabi_common.rpc.client import RpcClient
from hanabi_common.rpc.contract import ContractClient
from hanabi_wire.constants import INIT_EXEC_ID

from hanabi_agentd.contract import AGENTD
from hanabi_agentd.models import AgentDetails, AgentList, ProcessRef, ResizeProcess

SLACK_S = 5.0


class AgentdClient(ContractClient):
    """Calls agentd (one method per entry of its table, hanabi_agentd.contract). Deadlines
    leave agentd time to report its own DEADLINE_EXCEEDED."""

    contract = AGENTD

    def __init__(self, config: Config, timeout: float | None = None) -> None:
        self.config = config
        default = max(config.rpc.default_timeout_s, config.agent.request_timeout_s + SLACK_S)
        self.rpc = RpcClient("agentd", config.endpoint("agentd"), timeout=timeout or default)

    # --- agents ---------------------------------------------------------------------------
    def connect(self, sandbox_id: str, socket_path: str, timeout_s: float | None = None,
                transport: str = "unix", port: int | None = None) -> AgentInfo:
        """Connect to the agent behind `socket_path` (vmmd's VmInfo.agent_socket, used as its
        agent_transport and agent_port say) and wait until it answers (at most `timeout_s`,
        default config.agent.ready_timeout_s)."""
        wait = timeout_s or self.config.agent.ready_timeout_s
        return self.call(AGENTD.connect, ConnectAgent(sandbox_id=sandbox_id, socket_path=socket_path,
                                                      timeout_s=timeout_s, transport=transport,
                                                      port=port), timeout=wait + SLACK_S)

    def get(self, sandbox_id: str) -> AgentInfo:
        """The agent of one sandbox."""
        return self.call(AGENTD.get, SandboxRef(sandbox_id=sandbox_id))

    def list(self) -> AgentList:
        """Every agent agentd knows."""
        return self.call(AGENTD.list, NoArgs())

    def inspect(self, sandbox_id: str) -> AgentDetails:
        """The agent plus all containers and processes."""
        return self.call(AGENTD.inspect, SandboxRef(sandbox_id=sandbox_id))

    def disconnect(self, sandbox_id: str) -> Removed:
        """Shut the guest down (best effort) and forget the agent (idempotent)."""
        return self.call(AGENTD.disconnect, SandboxRef(sandbox_id=sandbox_id))

    def release(self, sandbox_id: str) -> Removed:
        """A container's delete, whose VM vmmd kills next: forget the sandbox, no word to the
        guest (idempotent)."""
        return self.call(AGENTD.release, SandboxRef(sandbox_id=sandbox_id))

    def configure_network(self, request: ConfigureNetwork) -> None:
        """Configure the guest's loopback, NICs and routes."""
        self.call(AGENTD.configure_network, request)

    # --- containers -----------------------------------------------------------------------
    def create_container(self, request: CreateContainer) -> None:
        """Create a container in the guest (mounts its disk); its process is not started yet."""
        self.call(AGENTD.create_container, request)

    def create(self, sandbox_id: str, container_id: str, rootfs: RootfsSpec, process: dict[str, Any],
               hostname: str | None = None) -> None:
        """Same as create_container, from its fields."""
        self.create_container(CreateContainer(sandbox_id=sandbox_id, container_id=container_id,
                                              rootfs=rootfs, process=process, hostname=hostname))

    def start(self, sandbox_id: str, container_id: str) -> StartedProcess:
        """Start the container's init process."""
        return self.call(AGENTD.start, ContainerRef(sandbox_id=sandbox_id, container_id=container_id))

    def exec(self, sandbox_id: str, container_id: str, exec_id: str, process: dict[str, Any]) -> StartedProcess:
        """Start one more process in a running container."""
        return self.call(AGENTD.exec, ExecProcess(sandbox_id=sandbox_id, container_id=container_id,
                                                  exec_id=exec_id, process=process))

    def signal(self, sandbox_id: str, container_id: str, signal: int, exec_id: str = INIT_EXEC_ID,
               all_processes: bool = False) -> None:
        """Send `signal` to a process (or to every process of the container)."""
        self.call(AGENTD.signal, SignalProcess(sandbox_id=sandbox_id, container_id=container_id,
                                               exec_id=exec_id, signal=signal, all=all_processes))

    def close_stdin(self, sandbox_id: str, container_id: str, exec_id: str = INIT_EXEC_ID) -> None:
        """Close a process's stdin."""
        self.call(AGENTD.close_stdin, ProcessRef(sandbox_id=sandbox_id, container_id=container_id,
                                                 exec_id=exec_id))

    def resize(self, sandbox_id: str, container_id: str, height: int, width: int,
               exec_id: str = INIT_EXEC_ID) -> None:
        """Set the window size (rows, columns) of a process's terminal."""
        self.call(AGENTD.resize, ResizeProcess(sandbox_id=sandbox_id, container_id=container_id,
                                               exec_id=exec_id, height=height, width=width))

    def state(self, sandbox_id: str, container_id: str) -> ContainerState:
        """Status of the container and its processes (also after they exited)."""
        return self.call(AGENTD.state, ContainerRef(sandbox_id=sandbox_id, container_id=container_id))

    def ps(self, sandbox_id: str, container_id: str) -> ProcessList:
        """The container's processes as the guest sees them."""
        return self.call(AGENTD.ps, ContainerRef(sandbox_id=sandbox_id, container_id=container_id))

    def destroy(self, sandbox_id: str, container_id: str) -> Removed:
        """Kill, unmount and forget a container (idempotent)."""
        return self.call(AGENTD.destroy, ContainerRef(sandbox_id=sandbox_id, container_id=container_id))
