"""State the in-guest agent keeps per container and per process, plus field validation.

The agent validates every request field itself (the host may be buggy); a bad field becomes
an ``AgentError`` with code INVALID_ARGUMENT.

STDLIB ONLY: runs inside the guest.
"""

from __future__ import annotations

import os
import re
import sys
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

from .sandbox import Rootfs

AGENT_VERSION = "0.1.0"

ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
HOSTNAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,62}[A-Za-z0-9])?")
SERIAL_RE = re.compile(r"[A-Za-z0-9_.:-]{1,20}")

# Container states.
CREATING = "creating"
CREATED = "created"
RUNNING = "running"
STOPPED = "stopped"
DESTROYING = "destroying"


def log(msg: str) -> None:
    """Write one line to the agent's stderr (the guest console)."""
    try:
        sys.stderr.write(f"hanabi-agent: {msg}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def log_exc(what: str) -> None:
    """Log ``what`` with the traceback of the exception being handled (imported lazily)."""
    import traceback

    log(f"{what}:\n{traceback.format_exc()}")


class AgentError(Exception):
    """A request failed; ``code`` is a protocol error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Pending:
    """Returned by a handler whose reply is sent later."""


PENDING = Pending()


class Proc:
    """One process started by the agent (a container's init or an exec).

    A process on a pty (``terminal: true``) has no stderr stream: ``stdout_fd`` is the pty
    master, ``stdin_fd`` a dup of it, and ``tty_fd`` another dup kept for resizes until the
    process is forgotten.
    """

    __slots__ = ("cid", "exec_id", "pid", "args", "stdin_fd", "stdin_buf", "stdin_close",
                 "streams", "status", "tty_fd")

    def __init__(self, cid: str, exec_id: str, pid: int, args: list[str], stdin_fd: int,
                 stdout_fd: int, stderr_fd: int | None, tty_fd: int | None = None) -> None:
        self.cid = cid
        self.exec_id = exec_id
        self.pid = pid
        self.args = args
        self.stdin_fd: int | None = stdin_fd
        self.stdin_buf = bytearray()
        self.stdin_close = False
        self.streams: dict[int, str] = {stdout_fd: "stdout"}
        if stderr_fd is not None:
            self.streams[stderr_fd] = "stderr"
        self.status: int | None = None  # raw wait status once reaped
        self.tty_fd = tty_fd

    @property
    def alive(self) -> bool:
        return self.status is None

    def exit_fields(self) -> dict[str, int | None]:
        """``exit_code``/``signal`` of the exit event from the wait status."""
        st = self.status or 0
        if os.WIFSIGNALED(st):
            return {"exit_code": None, "signal": os.WTERMSIG(st)}
        return {"exit_code": os.WEXITSTATUS(st), "signal": None}


class Container:
    """A container: its spec, its mounted rootfs and its processes by exec id."""

    __slots__ = ("cid", "process", "hostname", "rootfs_spec", "root", "state", "procs",
                 "destroy_waiters", "mounts", "mounts_disk", "security")

    def __init__(self, cid: str, process: dict[str, Any], hostname: str | None,
                 rootfs_spec: dict[str, Any]) -> None:
        self.cid = cid
        self.process = process
        self.hostname = hostname
        self.rootfs_spec = rootfs_spec
        self.root: Rootfs | None = None
        self.state = CREATING
        self.procs: dict[str, Proc] = {}
        self.destroy_waiters: list[int] = []
        self.mounts: list[dict[str, Any]] = []
        self.mounts_disk: dict[str, Any] | None = None
        self.security: Any = None  # hardening.Security: linux settings and seccomp filter


def need_str(msg: dict[str, Any], key: str, pattern: re.Pattern[str] | None = None,
             default: str | None = None) -> str:
    """Return the string field ``key`` (matching ``pattern``) or raise INVALID_ARGUMENT."""
    v = msg.get(key, default)
    if not isinstance(v, str) or (pattern is not None and not pattern.fullmatch(v)):
        raise AgentError("INVALID_ARGUMENT", f"field {key!r} is missing or invalid")
    return v


def need_bool(msg: dict[str, Any], key: str, default: bool = False) -> bool:
    v = msg.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise AgentError("INVALID_ARGUMENT", f"field {key!r} must be a boolean")
    return v


def need_int(msg: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = msg.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise AgentError("INVALID_ARGUMENT", f"field {key!r} must be an integer in {lo}..{hi}")
    return v


def check_rootfs(v: Any) -> dict[str, Any]:
    """Validate the ``rootfs`` object of create_container."""
    if not isinstance(v, dict):
        raise AgentError("INVALID_ARGUMENT", "field 'rootfs' must be an object")
    need_str(v, "serial", SERIAL_RE)
    if v.get("fstype", "ext4") != "ext4":
        raise AgentError("INVALID_ARGUMENT", "rootfs.fstype must be 'ext4'")
    need_bool(v, "readonly")
    return v
