"""Per-key locks (one per sandbox, say) that disappear when nobody holds or waits for them.

The one keyed-lock helper of the daemons. An entry counts its holder and its waiters and
is dropped only when that count reaches zero, so a caller can never get a fresh lock while
another still holds or waits for the old one (the flaw of a `setdefault` + `pop` pair, which
let two holders in at once). A wait is bounded by the lock's timeout and, inside an RPC
handler, by the caller's deadline (`rpc.context`): nobody takes the answer after that.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from collections.abc import Iterator

from hanabi_common.errors import DeadlineExceeded, Unavailable
from hanabi_common.rpc.context import current_call


class KeyedLocks:
    """`with locks.hold(sandbox_id):` serializes everything done to one sandbox."""

    def __init__(self, timeout: float | None = 120.0, what: str = "sandbox") -> None:
        self.timeout = timeout  # None: wait as long as the caller does
        self.what = what
        self._guard = threading.Lock()
        self._entries: dict[str, list] = {}  # key -> [lock, holders and waiters]

    def _wait_s(self) -> float:
        call = current_call()
        if call is not None:
            return call.within(self.timeout if self.timeout is not None else call.remaining)
        return -1 if self.timeout is None else self.timeout

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        """Hold the lock of `key`; Unavailable if it stays busy longer than the timeout,
        DeadlineExceeded if the caller's deadline passes first."""
        with self._guard:
            entry = self._entries.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            wait = self._wait_s()
            if not entry[0].acquire(timeout=wait):
                call = current_call()
                if call is not None and call.remaining <= 0:
                    raise DeadlineExceeded(f"{self.what} {key} stayed busy with another operation "
                                           f"until the caller's deadline")
                raise Unavailable(f"{self.what} {key} is busy with another operation; try again")
            try:
                yield
            finally:
                entry[0].release()
        finally:
            with self._guard:
                entry[1] -= 1
                if entry[1] == 0:
                    self._entries.pop(key, None)

    def locked(self, key: str) -> bool:
        """Whether someone holds the lock of `key` now."""
        with self._guard:
            entry = self._entries.get(key)
            return entry is not None and entry[0].locked()

    def __len__(self) -> int:
        with self._guard:
            return len(self._entries)
