"""Per-key locks (one per sandbox) that disappear when nobody holds or waits for them."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from collections.abc import Iterator

from hanabi_common.errors import Unavailable


class KeyedLocks:
    """`with locks.hold(sandbox_id):` serializes everything done to one sandbox."""

    def __init__(self, timeout: float = 120.0) -> None:
        self.timeout = timeout
        self._guard = threading.Lock()
        self._entries: dict[str, list] = {}  # key -> [lock, users]

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        """Hold the lock of `key`; Unavailable if it stays busy longer than the timeout."""
        with self._guard:
            entry = self._entries.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            if not entry[0].acquire(timeout=self.timeout):
                raise Unavailable(f"sandbox {key} is busy with another operation; try again")
            try:
                yield
            finally:
                entry[0].release()
        finally:
            with self._guard:
                entry[1] -= 1
                if entry[1] == 0:
                    self._entries.pop(key, None)

    def __len__(self) -> int:
        with self._guard:
            return len(self._entries)
