"""Noticing VMs that end on their own: one thread polling a pidfd per VM.

A pidfd becomes readable when its process exits. For a VM this vmmd spawned, the
`Popen` then reaps it and yields the exit status; for a VM adopted after a restart (some
other process is its parent now) the status is unknown and reported as None. The thread
owns its selector; `watch`/`unwatch` hand requests over through a queue and a wake pipe.
"""

from __future__ import annotations

import logging
import os
import queue
import selectors
import threading
from dataclasses import dataclass
from collections.abc import Callable

from hanabi_vmmd import proc
from hanabi_vmmd.hypervisor import VmHandle

log = logging.getLogger("hanabi.vmmd.reaper")
ExitCallback = Callable[[VmHandle, "int | None"], None]


@dataclass
class _Watch:
    handle: VmHandle
    fd: int


class Reaper:
    """Calls `on_exit(handle, exit_status)` (on its own thread) when a watched VM exits."""

    def __init__(self, on_exit: ExitCallback) -> None:
        self._on_exit = on_exit
        self._requests: queue.Queue[tuple[str, object]] = queue.Queue()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._selector = selectors.DefaultSelector()
        self._by_sandbox: dict[str, _Watch] = {}
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vmmd-reaper", daemon=True)
        self._thread.start()

    def watch(self, handle: VmHandle) -> None:
        """Start watching a VM (replaces an earlier watch of the same sandbox)."""
        self._request("watch", handle)

    def unwatch(self, sandbox_id: str) -> None:
        """Stop watching a sandbox's VM (no callback will follow)."""
        self._request("unwatch", sandbox_id)

    def close(self) -> None:
        """Stop the thread; the VMs keep running (idempotent)."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._request("close", None)
        self._thread.join(5)
        for watch in list(self._by_sandbox.values()):
            os.close(watch.fd)
        self._by_sandbox.clear()
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _request(self, kind: str, value: object) -> None:
        self._requests.put((kind, value))
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # the pipe is full: the loop wakes anyway

    def _run(self) -> None:
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        while not self._closed.is_set():
            for key, _ in self._selector.select(timeout=5.0):
                if key.data is None:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                else:
                    self._exited(key.data)
            self._apply_requests()

    def _apply_requests(self) -> None:
        while True:
            try:
                kind, value = self._requests.get_nowait()
            except queue.Empty:
                return
            if kind == "watch":
                self._add(value)  # type: ignore[arg-type]  # a "watch" request carries a VmHandle
            elif kind == "unwatch":
                self._remove(str(value))

    def _add(self, handle: VmHandle) -> None:
        self._remove(handle.sandbox_id)
        try:
            fd = os.pidfd_open(handle.pid)
        except (ProcessLookupError, OSError):
            self._fire(handle)
            return
        watch = _Watch(handle, fd)
        if handle.process is None and not proc.is_alive(handle.pid, handle.start_time):
            os.close(fd)  # exited before we looked, or the pid is someone else's now
            self._fire(handle)
            return
        self._by_sandbox[handle.sandbox_id] = watch
        self._selector.register(fd, selectors.EVENT_READ, watch)

    def _remove(self, sandbox_id: str) -> None:
        watch = self._by_sandbox.pop(sandbox_id, None)
        if watch is not None:
            self._selector.unregister(watch.fd)
            os.close(watch.fd)

    def _exited(self, watch: _Watch) -> None:
        if self._by_sandbox.get(watch.handle.sandbox_id) is watch:
            self._remove(watch.handle.sandbox_id)
            self._fire(watch.handle)

    def _fire(self, handle: VmHandle) -> None:
        status = None
        if handle.process is not None:
            status = proc.reap(handle.process)
        try:
            self._on_exit(handle, status)
        except Exception:  # noqa: BLE001 - a callback bug must not stop the reaper
            log.exception("exit callback failed", extra={"sandbox": handle.sandbox_id})
