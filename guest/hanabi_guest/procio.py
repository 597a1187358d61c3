"""Process I/O of the in-guest agent: output relay, stdin feeding, reaping, killing.

``ProcIO`` is a mixin of ``agent.Agent``. Each process's stdout/stderr pipe is read in
MAX_DATA_CHUNK pieces and relayed as ``output`` events (data frames: the bytes as they
are); ``stdin`` events are buffered and
written when the pipe is writable; SIGCHLD wake-ups reap every child (and every orphan the
kernel re-parents to PID 1). ``exit`` is sent when a process is reaped and both its output
pipes reached EOF (a process on a pty: when its master reads EOF or EIO, i.e. every holder
of the slave closed it). When a container's init dies its other processes are SIGKILLed (the
kernel does it too when the init was PID 1 of the container's PID namespace, see namespaces.py).

STDLIB ONLY: runs inside the guest.
"""

from __future__ import annotations

import os
import signal

import hanabi_wire as P

from .core import DESTROYING, STOPPED, Container, Proc, log
from .poller import EVENT_READ as R, EVENT_WRITE as W, Poller
from .sandbox import Sandbox

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any
    from collections.abc import Callable


class ProcIO:
    """Process bookkeeping and pipes; mixed into ``Agent``."""

    sel: Poller
    sandbox: Sandbox
    containers: dict[str, Container]
    procs: dict[int, Proc]
    out_fds: dict[int, Proc]
    paused: bool
    stdin_bytes: int

    if TYPE_CHECKING:  # provided by Agent / Handlers (stubs here would shadow them)
        def send(self, msg: dict[str, Any]) -> None: ...
        def container(self, msg: dict[str, Any]) -> Container: ...

    def _output_cb(self, proc: Proc, fd: int) -> Callable[[int], None]:
        return lambda mask: self._on_output(proc, fd)

    def add_proc(self, proc: Proc) -> None:
        self.procs[proc.pid] = proc
        for fd in proc.streams:
            self.out_fds[fd] = proc
            if not self.paused:
                self.sel.register(fd, R, self._output_cb(proc, fd))

    def _on_output(self, proc: Proc, fd: int) -> None:
        try:
            data = os.read(fd, P.MAX_DATA_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_stream(proc, fd)
            self._maybe_exited(proc)
            return
        self.send({"type": P.T_OUTPUT, "container_id": proc.cid, "exec_id": proc.exec_id,
                   "stream": proc.streams[fd], "data": data})

    def _close_stream(self, proc: Proc, fd: int) -> None:
        if self.out_fds.pop(fd, None) is not None and not self.paused:
            self.sel.unregister(fd)
        proc.streams.pop(fd, None)
        os.close(fd)

    def _on_stdin_event(self, msg: dict[str, Any]) -> None:
        """A checked ``stdin`` event: queue its bytes for the process's stdin."""
        c = self.container(msg)
        proc = c.procs.get(msg["exec_id"])
        if proc is None or proc.stdin_fd is None or proc.stdin_close:
            return
        data = _unseen_stdin(proc, msg["data"], msg.get("offset"))
        if data:
            proc.stdin_buf += data
            self.stdin_bytes += len(data)
            self.stdin_progress(proc)

    def stdin_progress(self, proc: Proc) -> None:
        if proc.stdin_fd is None:
            return
        fd = proc.stdin_fd
        while proc.stdin_buf:
            try:
                n = os.write(fd, proc.stdin_buf[:65536])
            except BlockingIOError:
                break
            except OSError:  # EPIPE: the reader is gone, drop what it will never read
                self.stdin_bytes -= len(proc.stdin_buf)
                proc.stdin_buf.clear()
                proc.stdin_close = True
                break
            del proc.stdin_buf[:n]
            self.stdin_bytes -= n
        registered = fd in self.sel.get_map()
        if proc.stdin_buf and not registered:
            self.sel.register(fd, W, lambda mask: self.stdin_progress(proc))
        elif not proc.stdin_buf:
            if registered:
                self.sel.unregister(fd)
            if proc.stdin_close:
                self._close_stdin_fd(proc)

    def _close_stdin_fd(self, proc: Proc) -> None:
        if proc.stdin_fd is None:
            return
        if proc.stdin_fd in self.sel.get_map():
            self.sel.unregister(proc.stdin_fd)
        os.close(proc.stdin_fd)
        proc.stdin_fd = None
        self.stdin_bytes -= len(proc.stdin_buf)
        proc.stdin_buf.clear()

    def _on_wake(self, fd: int) -> None:
        try:
            while os.read(fd, 4096):
                pass
        except BlockingIOError:
            pass
        self._reap()

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            proc = self.procs.get(pid)
            if proc is None:
                continue  # an orphan re-parented to PID 1, or a spawn failure already waited
            proc.status = status
            c = self.containers.get(proc.cid)
            if c is not None and proc.exec_id == P.INIT_EXEC_ID:
                # When the init process dies, the container dies (as its PID namespace does).
                c.state = STOPPED if c.state != DESTROYING else c.state
                self.kill_container(c, signal.SIGKILL)
            self._maybe_exited(proc)

    def _maybe_exited(self, proc: Proc) -> None:
        if proc.status is None or proc.streams or self.procs.get(proc.pid) is not proc:
            return
        self._close_stdin_fd(proc)
        _close_tty(proc)
        del self.procs[proc.pid]
        c = self.containers.get(proc.cid)
        if c is not None:
            self.check_oom(c)  # an OOM kill is reported before the exit it caused
        if c is not None and c.procs.get(proc.exec_id) is proc:
            del c.procs[proc.exec_id]
        # What the process wrote to a block device (a passthrough rootfs, the block root
        # layer) is on the host before its exit is: under runc it is in the host's page
        # cache when the process is gone, and `delete` SIGKILLs the VM without a shutdown.
        os.sync()
        self.send({"type": P.T_EXIT, "container_id": proc.cid, "exec_id": proc.exec_id,
                   **proc.exit_fields()})

    def watch_oom(self, c: Container) -> None:
        """Watch the OOM kills of ``c``'s cgroup (see oom.py); without a cgroup, nothing."""
        if c.root is None or not c.root.cgroup:
            return
        from .oom import OomWatch

        try:
            c.oom = OomWatch(c.root.cgroup)
        except OSError as exc:
            log(f"OOM kills of {c.cid} are not watched: {exc}")
            return
        self.sel.register(c.oom.fd, R, lambda mask: self._on_oom_fd(c))

    def _on_oom_fd(self, c: Container) -> None:
        if c.oom is not None:
            c.oom.drain()
            self.check_oom(c)

    def check_oom(self, c: Container) -> None:
        """Send ``oom`` if the OOM kill count of ``c``'s cgroup grew."""
        if c.oom is None:
            return
        count = c.oom.grown()
        if count is not None:
            self.send({"type": P.T_OOM, "container_id": c.cid, "oom_kills": count})

    def unwatch_oom(self, c: Container) -> None:
        """Stop watching (the container is going away): report a last OOM kill first."""
        if c.oom is None:
            return
        self.check_oom(c)
        if c.oom.fd in self.sel.get_map():
            self.sel.unregister(c.oom.fd)
        c.oom.close()
        c.oom = None

    def drop_proc(self, proc: Proc) -> None:
        """Forget a process that would not die or whose pipes stay open (destroy timeout)."""
        for fd in list(proc.streams):
            self._close_stream(proc, fd)
        if proc.status is not None:
            self._maybe_exited(proc)
            return
        log(f"process {proc.pid} ({proc.cid}/{proc.exec_id}) did not die; forgetting it")
        self._close_stdin_fd(proc)
        _close_tty(proc)
        self.procs.pop(proc.pid, None)
        c = self.containers.get(proc.cid)
        if c is not None:
            c.procs.pop(proc.exec_id, None)

    def kill_container(self, c: Container, sig: int) -> None:
        """Send ``sig`` once to every process of ``c``: its cgroup if it has one, else the
        process group of each process the agent started (each leads its own session)."""
        if c.root is not None:
            if sig == signal.SIGKILL and self.sandbox.kill_cgroup(c.root):
                return
            pids = self.sandbox.cgroup_pids(c.root)
            if pids:
                for pid in pids:
                    _kill(os.kill, pid, sig)
                return
        for proc in c.procs.values():
            _kill(os.killpg, proc.pid, sig)
            try:
                moved = proc.alive and os.getpgid(proc.pid) != proc.pid
            except OSError:
                moved = False
            if moved:  # it left its group: signal it directly too
                _kill(os.kill, proc.pid, sig)


def _close_tty(proc: Proc) -> None:
    if proc.tty_fd is not None:
        os.close(proc.tty_fd)
        proc.tty_fd = None


def _kill(fn: Callable[[int, int], None], pid: int, sig: int) -> None:
    try:
        fn(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _unseen_stdin(proc: Proc, data: bytes, offset: int | None) -> bytes:
    """The part of a stdin chunk at `offset` that the process has not had yet: a host that
    lost its connection sends again what may not have arrived (docs/agent-protocol.md,
    "Replay"); a chunk without an offset is taken whole."""
    if offset is None:
        proc.stdin_received += len(data)
        return data
    end = offset + len(data)
    if end <= proc.stdin_received:
        return b""
    if offset > proc.stdin_received:  # the host lost bytes before these: say so, go on
        log(f"stdin of {proc.cid}/{proc.exec_id}: {offset - proc.stdin_received} bytes never arrived")
        fresh = data
    else:
        fresh = data[proc.stdin_received - offset:]
    proc.stdin_received = end
    return fresh
