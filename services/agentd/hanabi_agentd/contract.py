"""agentd's RPC contract: every agent.* and container.* method, its models and whether a
retry is harmless.

Drives `AgentService.register` and `AgentdClient` (hanabi_common.rpc.contract); the lean
runtime (hanabi_runtime.lean), which cannot pay for pydantic, calls a few of these by name,
and a test holds it to this table.
"""

from __future__ import annotations

from hanabi_common.models.agentd import (AgentInfo, ConfigureNetwork, ConnectAgent, ContainerRef, ContainerState,
                                         CreateContainer, ExecProcess, ProcessList, SignalProcess, StartedProcess)
from hanabi_common.models.base import Done, NoArgs, Removed, SandboxRef
from hanabi_common.rpc.contract import Contract, Rpc

from hanabi_agentd.models import AgentDetails, AgentList, ProcessRef, ResizeProcess


class AGENTD(Contract):
    """agentd: the relay to the guest agents."""

    daemon = "agentd"
    connect = Rpc("agent.connect", ConnectAgent, AgentInfo)
    get = Rpc("agent.get", SandboxRef, AgentInfo, idempotent=True)
    list = Rpc("agent.list", NoArgs, AgentList, idempotent=True)
    inspect = Rpc("agent.inspect", SandboxRef, AgentDetails, idempotent=True)
    disconnect = Rpc("agent.disconnect", SandboxRef, Removed, idempotent=True)
    release = Rpc("agent.release", SandboxRef, Removed, idempotent=True)
    configure_network = Rpc("agent.configure_network", ConfigureNetwork, Done)
    create_container = Rpc("container.create", CreateContainer, Done, handler="create")
    start = Rpc("container.start", ContainerRef, StartedProcess)
    exec = Rpc("container.exec", ExecProcess, StartedProcess)
    signal = Rpc("container.signal", SignalProcess, Done)
    close_stdin = Rpc("container.close_stdin", ProcessRef, Done)
    resize = Rpc("container.resize", ResizeProcess, Done, idempotent=True)
    state = Rpc("container.state", ContainerRef, ContainerState, idempotent=True)
    ps = Rpc("container.ps", ContainerRef, ProcessList, idempotent=True)
    destroy = Rpc("container.destroy", ContainerRef, Removed, idempotent=True)
