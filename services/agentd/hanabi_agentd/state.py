"""agentd's per-sandbox state file, agent.json.

It records where the agent is (address and channel kind), what it said it is, and every
container and process with its status and exit status. It is rewritten whenever a process
starts or exits, so `container.state` works after the exit and a restarted agentd knows
every container (and reconnects to the agents whose sockets still exist).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from hanabi_common.models.agentd import ProcessStatus
from hanabi_common.state import VersionedState

from hanabi_agentd.channel import ChannelKind

STATE_NAME = "agent"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProcessEntry(_Strict):
    """One process as last recorded."""

    exec_id: str
    status: ProcessStatus
    pid: int | None = None
    exit_code: int | None = None
    signal: int | None = None


class ContainerEntry(_Strict):
    """One container and its processes."""

    container_id: str
    processes: dict[str, ProcessEntry] = Field(default_factory=dict)


class AgentState(VersionedState):
    """Everything agentd must know about one sandbox's agent after a restart."""

    sandbox_id: str
    address: str
    channel_kind: ChannelKind = "unix"
    agent_version: str = ""
    kernel: str = ""
    connected_at: float | None = None
    containers: dict[str, ContainerEntry] = Field(default_factory=dict)
    dns_netns: str | None = None
    dns_servers: list[str] = Field(default_factory=list)
