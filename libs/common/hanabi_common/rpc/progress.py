"""Whether an RPC server's workers make progress: what the systemd watchdog is fed from.

The loop thread turning proves little: a daemon whose workers are all stuck (a deadlock, a
hung syscall) still polls its socket. So the server records every call a worker runs and
regularly hands the pool a no-op *canary*. `Progress.stalled(now)` names the problem when

- a canary has waited longer than `stall_s` for a worker (no worker is free: the pool is
  wedged), or
- a call has run `stall_s` past its caller's deadline (a wedged worker: nobody waits for
  its answer any more and it still holds a thread).

Pure logic with an explicit clock (time.monotonic by default); thread-safe.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable


class Progress:
    """In-flight calls and the canary, for one server."""

    def __init__(self, stall_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.stall_s = stall_s
        self._clock = clock
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._calls: dict[int, tuple[str, float]] = {}  # id -> (method, must end by)
        self._canary_sent: float | None = None
        self.completed = 0

    def begin(self, method: str, seconds_left: float) -> int:
        """A worker starts a call whose caller gives up in `seconds_left`; returns its token."""
        with self._lock:
            token = next(self._ids)
            self._calls[token] = (method, self._clock() + max(seconds_left, 0.0))
            return token

    def end(self, token: int) -> None:
        """The worker finished the call."""
        with self._lock:
            self._calls.pop(token, None)
            self.completed += 1

    def canary_due(self) -> bool:
        """Whether to send a canary now (none is waiting); marks it sent."""
        with self._lock:
            if self._canary_sent is not None:
                return False
            self._canary_sent = self._clock()
            return True

    def canary_ran(self) -> None:
        """A worker ran the canary."""
        with self._lock:
            self._canary_sent = None

    def stalled(self) -> str | None:
        """Why the workers are not making progress, or None when they are."""
        now = self._clock()
        with self._lock:
            if self._canary_sent is not None and now - self._canary_sent > self.stall_s:
                return (f"no RPC worker was free for {now - self._canary_sent:.0f}s "
                        f"({len(self._calls)} calls running)")
            for method, must_end in self._calls.values():
                if now - must_end > self.stall_s:
                    return f"a worker is stuck in {method}, {now - must_end:.0f}s past its deadline"
        return None

    def running(self) -> int:
        """How many calls the workers are running."""
        with self._lock:
            return len(self._calls)


class Watchdog:
    """Feeds systemd's watchdog (`WATCHDOG=1` every `interval` seconds) only while
    `progress` sees the workers making progress; otherwise withholds it, so systemd
    restarts the daemon once WatchdogSec passes, and says why (log and STATUS=)."""

    def __init__(self, interval: float | None, progress: Progress, notify: Callable[..., bool],
                 log, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.progress = progress
        self._notify = notify
        self._log = log
        self._clock = clock
        self._last = float("-inf")
        self.withheld: str | None = None

    def tick(self) -> None:
        """Called by the server loop on every turn."""
        if not self.interval or self._clock() - self._last < self.interval:
            return
        why = self.progress.stalled()
        if why is None:
            self._notify("WATCHDOG=1")
            self._last = self._clock()
            if self.withheld is not None:
                self._log.warning("the RPC workers make progress again, watchdog fed again")
                self._notify("STATUS=serving")
                self.withheld = None
        elif self.withheld is None:
            self.withheld = why
            self._log.error("watchdog withheld: the RPC workers make no progress", extra={"reason": why})
            self._notify(f"STATUS=stalled: {why}")
