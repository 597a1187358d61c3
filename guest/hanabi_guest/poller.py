"""A minimal epoll-based selector (the subset of ``selectors`` the agent uses).

``selectors`` costs about 25 ms to import in a cold TCG guest; this does not. Semantics
follow ``selectors.EpollSelector``: HUP/ERR wake a registration as readable *and* writable
so the owner's read/write sees the EOF or error.

STDLIB ONLY: runs inside the guest.
"""

from __future__ import annotations

import select

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

EVENT_READ = 1
EVENT_WRITE = 2
EVENT_EDGE = 4  # edge-triggered (EPOLLET): one report per change of the descriptor


class Key:
    """One registration: descriptor, wanted events and the owner's data (a callback)."""

    __slots__ = ("fd", "events", "data")

    def __init__(self, fd: int, events: int, data: Any) -> None:
        self.fd = fd
        self.events = events
        self.data = data


class Poller:
    """register/unregister/get_map/select over one epoll instance."""

    def __init__(self) -> None:
        self.ep = select.epoll()
        self.keys: dict[int, Key] = {}

    @staticmethod
    def _mask(events: int) -> int:
        return ((select.EPOLLIN if events & EVENT_READ else 0) | (select.EPOLLOUT if events & EVENT_WRITE else 0)
                | (select.EPOLLET if events & EVENT_EDGE else 0))

    def register(self, fd: int, events: int, data: Any) -> Key:
        if fd in self.keys:
            raise KeyError(f"fd {fd} is already registered")
        self.ep.register(fd, self._mask(events))
        key = self.keys[fd] = Key(fd, events, data)
        return key

    def unregister(self, fd: int) -> Key:
        key = self.keys.pop(fd)
        try:
            self.ep.unregister(fd)
        except OSError:  # already closed: the kernel dropped it
            pass
        return key

    def get_map(self) -> dict[int, Key]:
        return self.keys

    def select(self, timeout: float | None) -> list[tuple[Key, int]]:
        ready = self.ep.poll(-1 if timeout is None else max(timeout, 0.0), max(len(self.keys), 1))
        out = []
        for fd, ev in ready:
            key = self.keys.get(fd)
            if key is None:
                continue
            mask = (EVENT_READ if ev & ~select.EPOLLOUT else 0) | (EVENT_WRITE if ev & ~select.EPOLLIN else 0)
            mask &= key.events
            if mask:
                out.append((key, mask))
        return out
