"""RPC models agentd needs beyond hanabi_common.models.agentd (candidates to move there)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from hanabi_common.models.agentd import AgentInfo
from hanabi_common.models.base import ContainerId, ExecId, Reply, Request, SandboxId
from hanabi_wire import INIT_EXEC_ID, MAX_TTY_DIM


class ProcessRef(Request):
    """Names one process of a container (its init process by default)."""

    sandbox_id: SandboxId
    container_id: ContainerId
    exec_id: ExecId = INIT_EXEC_ID


# Rows or columns of a terminal: a strict integer in 1..65535 (struct winsize holds u16).
TtyDim = Annotated[int, Field(strict=True, ge=1, le=MAX_TTY_DIM)]


class ResizeProcess(Request):
    """`container.resize`: set the window size of a process's terminal (terminal: true)."""

    sandbox_id: SandboxId
    container_id: ContainerId
    exec_id: ExecId = INIT_EXEC_ID
    height: TtyDim
    width: TtyDim


class AgentList(Reply):
    """Every sandbox agentd knows an agent of."""

    agents: list[AgentInfo]


class AgentDetails(Reply):
    """`agent.inspect`: the agent plus every container and process (agent.json, live)."""

    agent: AgentInfo
    address: str
    channel_kind: str
    lost_reason: str | None = None
    containers: dict[str, Any] = {}
