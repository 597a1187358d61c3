"""OOM kills in a container's cgroup, watched as containerd's shim watches them on a host.

The guest's OOM killer ends a process of a container when the container's cgroup v2 group
reaches its ``memory.max``; the kernel then increments ``oom_kill`` in that group's
``memory.events`` and notifies the file (inotify IN_MODIFY, as on a host with cgroup v2,
where containerd's runc shim watches it). ``OomWatch`` holds such an inotify descriptor for
the agent's poller; the agent reads the count when it fires and again before it sends any
``exit`` of the container's processes (so an ``oom`` event always comes before the exit of
the process it killed), and sends ``oom`` {container_id, oom_kills} when it grew.

STDLIB ONLY: runs inside the guest (ctypes for inotify: the guest's Python has no module).
"""

from __future__ import annotations

import os

EVENTS_FILE = "memory.events"
IN_MODIFY = 0x00000002
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC


def parse_oom_kills(text: str) -> int:
    """The ``oom_kill`` count of a ``memory.events`` text (0 when absent or malformed)."""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            value = value.strip()
            return int(value) if value.isdigit() else 0
    return 0


def read_oom_kills(cgroup: str) -> int:
    """The ``oom_kill`` count of cgroup directory ``cgroup`` (0 when it cannot be read)."""
    try:
        with open(os.path.join(cgroup, EVENTS_FILE), encoding="ascii", errors="replace") as f:
            return parse_oom_kills(f.read())
    except OSError:
        return 0


class OomWatch:
    """An inotify descriptor watching one ``memory.events`` file; ``fd`` goes to the poller,
    ``drain()`` empties it when readable, ``close()`` ends it."""

    __slots__ = ("fd", "path", "last")

    def __init__(self, cgroup: str) -> None:
        from .sandbox import libc

        self.path = os.path.join(cgroup, EVENTS_FILE)
        self.last = read_oom_kills(cgroup)  # what the group had before the container ran
        fd = libc().inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            import ctypes

            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        if libc().inotify_add_watch(fd, self.path.encode(), IN_MODIFY) < 0:
            import ctypes

            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"inotify_add_watch {self.path}: {os.strerror(err)}")
        self.fd = fd

    def drain(self) -> None:
        """Read every queued inotify event (their content does not matter: the count does)."""
        try:
            while os.read(self.fd, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def grown(self) -> int | None:
        """The new ``oom_kill`` count if it grew since the last call, else None."""
        try:
            with open(self.path, encoding="ascii", errors="replace") as f:
                count = parse_oom_kills(f.read())
        except OSError:  # the group is gone
            return None
        if count > self.last:
            self.last = count
            return count
        return None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
