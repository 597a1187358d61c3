"""Watch a wired network namespace for links that come and go after the container started.

`docker network connect` and `disconnect` change a running container's namespace
directly (no runtime call): a veth is moved in, renamed, addressed and brought up, or
removed. A watcher holds a netlink socket subscribed to that namespace's link, address
and route events (made inside the namespace: a netlink socket stays in the namespace it
was made in) and, once events stop arriving for SETTLE_S, calls `on_change` from its own
thread. The service decides what changed (`topology.plan_change`) and acts.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable
from typing import Any

from hanabi_common.netns import call_in_netns

log = logging.getLogger("hanabi.netd.watch")
SETTLE_S = 0.3
# Without a change pending the watcher sleeps until an event or stop() (its wake pipe): no
# timed wake-ups, which every running sandbox would pay for (issue 14: idle host CPU).
IDLE_WAIT_S = None


class NetnsWatcher:
    """One namespace's netlink events, debounced into `on_change()` calls."""

    def __init__(self, sandbox_id: str, netns_path: str, on_change: Callable[[], None]) -> None:
        self.sandbox_id = sandbox_id
        self.netns_path = netns_path
        self.on_change = on_change
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ipr: Any = None  # a pyroute2 IPRoute (untyped)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)  # stop() ends the select at once

    def start(self) -> None:
        """Subscribe (in the namespace) and start the watching thread."""
        from pyroute2 import IPRoute

        def subscribe():
            ipr = IPRoute()
            ipr.bind()
            return ipr

        self._ipr = call_in_netns(self.netns_path, subscribe)
        self._thread = threading.Thread(target=self._run, name=f"netd-watch-{self.sandbox_id[:12]}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching (waits for a change in progress to finish)."""
        self._stop.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass  # stopped already
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

    def _drain(self) -> bool:
        """Read what is queued; True when any of it was an event."""
        try:
            return bool(self._ipr.get())
        except Exception:  # noqa: BLE001 - a namespace that went away closes the socket
            return False

    def _run(self) -> None:
        pending = False
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._ipr.fileno(), self._wake_r], [], [],
                                            SETTLE_S if pending else IDLE_WAIT_S)
            except (OSError, ValueError):
                return
            if self._stop.is_set():
                return
            if ready:
                pending = self._drain() or pending
                continue
            if pending:
                pending = False
                try:
                    self.on_change()
                except Exception:  # noqa: BLE001 - the watcher must outlive one failed change
                    log.exception("network change not applied", extra={"sandbox": self.sandbox_id})
