"""What agentd knows of each container process: status, exit status, and its output buffer.

A `ProcessRecord` is shared by the session's reader thread (which appends output and
records the exit) and by the io server (whose writer drains output to the attached io
client, then hands over the exit). Output waits in one ordered, bounded buffer, so the
client always sees every buffered chunk before the exit. Above the limit the oldest
chunks are dropped (and counted): the guest channel is shared by all processes and must
never stall because one client reads slowly or is not attached yet. A chunk carries the
guest's `seq`; one at or below the last seen (a replay after a reconnect) is dropped here,
and the io client drops again what it had before an agentd restart.
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass
from typing import Literal

from hanabi_common.models.agentd import ContainerState, ProcessState, ProcessStatus
from hanabi_wire import INIT_EXEC_ID

log = logging.getLogger("hanabi.agentd")
Stream = Literal["stdout", "stderr"]


@dataclass(frozen=True)
class OutputEvent:
    """A chunk of output to hand to the io client."""

    stream: Stream
    data: bytes
    seq: int | None = None


@dataclass(frozen=True)
class OomEvent:
    """The guest's OOM killer ended a process of the container: its cgroup's count so far."""

    oom_kills: int


@dataclass(frozen=True)
class ExitEvent:
    """The end of a process (both None when the status is unknown, e.g. the VM died)."""

    exit_code: int | None
    signal: int | None


class ProcessRecord:
    """One process (exec id) of one container."""

    def __init__(self, container_id: str, exec_id: str, limit: int, *,
                 status: ProcessStatus = "created", pid: int | None = None,
                 exit_code: int | None = None, signal: int | None = None) -> None:
        self.container_id = container_id
        self.exec_id = exec_id
        self.limit = limit
        self.status: ProcessStatus = status
        self.pid = pid
        self.exit_code = exit_code
        self.signal = signal
        self.dropped = 0
        self.last_seq = 0
        self._chunks: collections.deque[OutputEvent] = collections.deque()
        self._size = 0
        self._cond = threading.Condition()
        self._client: object | None = None
        self._exit_published = True
        self.oom_kills = 0  # the container's OOM kill count (the init's record carries it)
        self._oom_delivered = 0  # what the attached client was given

    # --- status -----------------------------------------------------------------------
    def mark_running(self, pid: int) -> None:
        """The agent started it (unless its exit already arrived: keep that)."""
        with self._cond:
            self.pid = pid
            if self.status == "created":
                self.status = "running"
            self._cond.notify_all()

    def mark_exited(self, exit_code: int | None, signal: int | None, *, publish: bool = True) -> bool:
        """Record the exit; False if it was already recorded (a duplicate). With
        publish=False the io client hears of it only after `publish_exit()` (agentd first
        writes it to agent.json, so whoever reacts to the exit finds it recorded)."""
        with self._cond:
            if self.status == "stopped":
                return False
            self.status = "stopped"
            self.exit_code = exit_code
            self.signal = signal
            self._exit_published = publish
            self._cond.notify_all()
            return True

    def publish_exit(self) -> None:
        """Let the io client see the exit recorded with publish=False."""
        with self._cond:
            self._exit_published = True
            self._cond.notify_all()

    def push_oom(self, oom_kills: int) -> bool:
        """Record the container's OOM kill count; False when it did not grow (a replay).
        The io client hears of it before any later output and before the exit."""
        with self._cond:
            if oom_kills <= self.oom_kills:
                return False
            self.oom_kills = oom_kills
            self._cond.notify_all()
            return True

    def wait_started(self, timeout: float) -> bool:
        """Wait until it is running or stopped; True when it no longer is 'created'."""
        with self._cond:
            return self._cond.wait_for(lambda: self.status != "created", timeout)

    def state(self) -> ProcessState:
        """The public view."""
        with self._cond:
            return ProcessState(exec_id=self.exec_id, status=self.status, pid=self.pid,
                                exit_code=self.exit_code, signal=self.signal)

    # --- output -----------------------------------------------------------------------
    def push_output(self, stream: Stream, data: bytes, seq: int | None = None) -> None:
        """Buffer a chunk (unless its `seq` shows it was had already); drop the oldest
        ones above the limit."""
        if not data:
            return
        with self._cond:
            if seq is not None:
                if seq <= self.last_seq:
                    return
                self.last_seq = seq
            self._chunks.append(OutputEvent(stream, data, seq))
            self._size += len(data)
            dropped = 0
            while self._size > self.limit and len(self._chunks) > 1:
                old = self._chunks.popleft()
                self._size -= len(old.data)
                dropped += len(old.data)
            self._cond.notify_all()
        if dropped:
            if self.dropped == 0:
                log.warning("output buffer full, dropping the oldest output",
                            extra={"container": self.container_id, "exec": self.exec_id,
                                   "limit": self.limit})
            self.dropped += dropped

    def buffered(self) -> int:
        """Bytes of output waiting for the io client."""
        with self._cond:
            return self._size

    # --- the io client ----------------------------------------------------------------
    def attach(self, client: object) -> bool:
        """Make `client` the one io client; False if another one is attached."""
        with self._cond:
            if self._client is not None:
                return False
            self._client = client
            self._oom_delivered = 0  # a new client hears the count again (it drops repeats)
            return True

    def detach(self, client: object) -> None:
        """Forget `client` (if it is the attached one) and wake its writer."""
        with self._cond:
            if self._client is client:
                self._client = None
            self._cond.notify_all()

    def is_attached(self, client: object) -> bool:
        """Whether `client` is the attached io client."""
        with self._cond:
            return self._client is client

    def next_event(self, client: object, timeout: float) -> OutputEvent | OomEvent | ExitEvent | None:
        """For `client`'s writer: a grown OOM kill count, else the next output chunk, else
        the exit once all output is out; None on timeout or when `client` is no longer
        attached."""
        with self._cond:
            self._cond.wait_for(lambda: self._client is not client or bool(self._chunks)
                                or self.oom_kills > self._oom_delivered or self._exit_visible(), timeout)
            if self._client is not client:
                return None
            if self.oom_kills > self._oom_delivered:
                self._oom_delivered = self.oom_kills
                return OomEvent(self.oom_kills)
            if self._chunks:
                event = self._chunks.popleft()
                self._size -= len(event.data)
                return event
            if self._exit_visible():
                return ExitEvent(self.exit_code, self.signal)
            return None

    def _exit_visible(self) -> bool:
        return self.status == "stopped" and self._exit_published

    def unread(self, event: OutputEvent) -> None:
        """Put back a chunk the writer could not deliver (its client went away)."""
        with self._cond:
            self._chunks.appendleft(event)
            self._size += len(event.data)


class ContainerRecord:
    """A container created in the guest and its processes ("init" first)."""

    def __init__(self, container_id: str, init: ProcessRecord) -> None:
        self.container_id = container_id
        self.processes: dict[str, ProcessRecord] = {INIT_EXEC_ID: init}

    @property
    def init(self) -> ProcessRecord:
        """The container's first process."""
        return self.processes[INIT_EXEC_ID]

    def state(self, sandbox_id: str) -> ContainerState:
        """The public view: status of init, and every process."""
        procs = [p.state() for p in list(self.processes.values())]
        return ContainerState(sandbox_id=sandbox_id, container_id=self.container_id,
                              status=self.init.status, processes=procs)
