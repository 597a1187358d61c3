"""State the in-guest agent keeps per container and per process.

The agent validates every request with ``hanabi_wire`` before a handler sees it (the host
may be buggy); a bad field becomes an error reply with code INVALID_ARGUMENT.

STDLIB ONLY: runs inside the guest.
"""

from __future__ import annotations

import os
import sys

from hanabi_wire.constants import E_INVALID_ARGUMENT

from .sandbox import Rootfs

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

AGENT_VERSION = "0.1.0"

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
                 "stdin_received", "streams", "status", "tty_fd")

    def __init__(self, cid: str, exec_id: str, pid: int, args: list[str], stdin_fd: int,
                 stdout_fd: int, stderr_fd: int | None, tty_fd: int | None = None) -> None:
        self.cid = cid
        self.exec_id = exec_id
        self.pid = pid
        self.args = args
        self.stdin_fd: int | None = stdin_fd
        self.stdin_buf = bytearray()
        self.stdin_close = False
        self.stdin_received = 0  # bytes of its stdin taken so far (the next chunk's `offset`)
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
                 "destroy_waiters", "mounts", "mounts_disk", "share", "security", "oom", "join", "held")

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
        self.share: str | None = None  # its directory in the VM's file share (binds live there)
        self.security: Any = None  # hardening.Security: linux settings and seccomp filter
        self.oom: Any = None  # oom.OomWatch of its cgroup's memory.events (in the guest)
        self.join: dict[str, str] = {}  # namespace kind -> the container whose init's its init joins
        self.held: Any = None  # process.Held: its init, made after create, waiting for start


def check_rootfs(checked: dict[str, Any]) -> dict[str, Any]:
    """The rule the field table cannot say about create_container's ``rootfs`` (already
    checked against ``ROOTFS``): a disk by virtio ``serial`` (fstype ext4), or a ``share``
    directory ``<container>/rootfs`` (fstype 9p), never both."""
    if (checked["share"] is None) == (checked["serial"] is None):
        raise AgentError(E_INVALID_ARGUMENT, "field 'rootfs' needs exactly one of 'serial' and 'share'")
    if (checked["share"] is not None) != (checked["fstype"] == "9p"):
        raise AgentError(E_INVALID_ARGUMENT, "field 'rootfs': a share has fstype '9p', a disk 'ext4'")
    return checked
