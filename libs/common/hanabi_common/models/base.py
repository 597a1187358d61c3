"""Shared bits of the message models."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

from hanabi_common.ids import validate_id


def _sandbox_id(value: str) -> str:
    try:
        return validate_id(value, "sandbox id")
    except Exception as exc:  # pydantic wants ValueError
        raise ValueError(str(exc)) from None


SandboxId = Annotated[str, AfterValidator(_sandbox_id)]
ContainerId = SandboxId
ExecId = SandboxId


class Request(BaseModel):
    """Base of every request: unknown fields are an error."""

    model_config = ConfigDict(extra="forbid")


class Reply(BaseModel):
    """Base of every reply: unknown fields are ignored (newer daemons may add some)."""

    model_config = ConfigDict(extra="ignore")


class SandboxRef(Request):
    """A request that names one sandbox."""

    sandbox_id: SandboxId


class Removed(Reply):
    """Reply of an idempotent removal: whether there was something to remove."""

    existed: bool


class Done(Reply):
    """Reply of a call that has nothing to report beyond its success."""


class NoArgs(Request):
    """A request without arguments."""


class Drain(Request):
    """Wait until the daemon's released sandboxes are all torn down (hanabi_common.releasing)."""

    timeout_s: float = 30.0


class Drained(Reply):
    """Reply of a drain: the sandboxes whose teardown is still pending (empty: all done)."""

    pending: list[str]
