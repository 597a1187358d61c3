"""Typed client of agentd, used by the runtime CLI (and the ctl commands)."""

from __future__ import annotations

from typing import Any

from hanabi_common.config import Config
from hanabi_common.models.agentd import (AgentInfo, ConfigureNetwork, ConnectAgent, ContainerRef, ContainerState,
                                         CreateContainer, ExecProcess, ProcessList, RootfsSpec,
                                         SignalProcess, StartedProcess)
from hanabi_common.models.base import Removed, SandboxRef
from hanabi_common.rpc.client import RpcClient

from hanabi_agentd.models import AgentDetails, AgentList, ProcessRef, ResizeProcess

SLACK_S = 5.0


class AgentdClient:
    """Calls agentd. Deadlines leave agentd time to report its own DEADLINE_EXCEEDED."""

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
        return self.rpc.call("agent.connect", ConnectAgent(sandbox_id=sandbox_id, socket_path=socket_path,
                                                           timeout_s=timeout_s, transport=transport,
                                                           port=port),
                             AgentInfo, timeout=wait + SLACK_S)

    def get(self, sandbox_id: str) -> AgentInfo:
        """The agent of one sandbox."""
        return self.rpc.call("agent.get", SandboxRef(sandbox_id=sandbox_id), AgentInfo, idempotent=True)

    def list(self) -> AgentList:
        """Every agent agentd knows."""
        return self.rpc.call("agent.list", {}, AgentList, idempotent=True)

    def inspect(self, sandbox_id: str) -> AgentDetails:
        """The agent plus all containers and processes."""
        return self.rpc.call("agent.inspect", SandboxRef(sandbox_id=sandbox_id), AgentDetails, idempotent=True)

    def disconnect(self, sandbox_id: str) -> Removed:
        """Shut the guest down (best effort) and forget the agent (idempotent)."""
        return self.rpc.call("agent.disconnect", SandboxRef(sandbox_id=sandbox_id), Removed, idempotent=True)

    def configure_network(self, request: ConfigureNetwork) -> None:
        """Configure the guest's loopback, NICs and routes."""
        self.rpc.call("agent.configure_network", request)

    # --- containers -----------------------------------------------------------------------
    def create_container(self, request: CreateContainer) -> None:
        """Create a container in the guest (mounts its disk); its process is not started yet."""
        self.rpc.call("container.create", request)

    def create(self, sandbox_id: str, container_id: str, rootfs: RootfsSpec, process: dict[str, Any],
               hostname: str | None = None) -> None:
        """Same as create_container, from its fields."""
        self.create_container(CreateContainer(sandbox_id=sandbox_id, container_id=container_id,
                                              rootfs=rootfs, process=process, hostname=hostname))

    def start(self, sandbox_id: str, container_id: str) -> StartedProcess:
        """Start the container's init process."""
        return self.rpc.call("container.start", ContainerRef(sandbox_id=sandbox_id, container_id=container_id),
                             StartedProcess)

    def exec(self, sandbox_id: str, container_id: str, exec_id: str, process: dict[str, Any]) -> StartedProcess:
        """Start one more process in a running container."""
        return self.rpc.call("container.exec", ExecProcess(sandbox_id=sandbox_id, container_id=container_id,
                                                           exec_id=exec_id, process=process), StartedProcess)

    def signal(self, sandbox_id: str, container_id: str, signal: int, exec_id: str = "init",
               all_processes: bool = False) -> None:
        """Send `signal` to a process (or to every process of the container)."""
        self.rpc.call("container.signal", SignalProcess(sandbox_id=sandbox_id, container_id=container_id,
                                                        exec_id=exec_id, signal=signal, all=all_processes))

    def close_stdin(self, sandbox_id: str, container_id: str, exec_id: str = "init") -> None:
        """Close a process's stdin."""
        self.rpc.call("container.close_stdin", ProcessRef(sandbox_id=sandbox_id, container_id=container_id,
                                                          exec_id=exec_id))

    def resize(self, sandbox_id: str, container_id: str, height: int, width: int,
               exec_id: str = "init") -> None:
        """Set the window size (rows, columns) of a process's terminal."""
        self.rpc.call("container.resize", ResizeProcess(sandbox_id=sandbox_id, container_id=container_id,
                                                        exec_id=exec_id, height=height, width=width),
                      idempotent=True)

    def state(self, sandbox_id: str, container_id: str) -> ContainerState:
        """Status of the container and its processes (also after they exited)."""
        return self.rpc.call("container.state", ContainerRef(sandbox_id=sandbox_id, container_id=container_id),
                             ContainerState, idempotent=True)

    def ps(self, sandbox_id: str, container_id: str) -> ProcessList:
        """The container's processes as the guest sees them."""
        return self.rpc.call("container.ps", ContainerRef(sandbox_id=sandbox_id, container_id=container_id),
                             ProcessList, idempotent=True)

    def destroy(self, sandbox_id: str, container_id: str) -> Removed:
        """Kill, unmount and forget a container (idempotent)."""
        return self.rpc.call("container.destroy", ContainerRef(sandbox_id=sandbox_id, container_id=container_id),
                             Removed, idempotent=True)
