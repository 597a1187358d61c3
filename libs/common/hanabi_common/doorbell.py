"""A doorbell: a FIFO in a sandbox's state directory that one process waits on and another
rings, so the waiter sleeps instead of polling (issue 14: every timed wake-up of a process
that runs per container is paid 200 times on a full host).

The waiter (`Doorbell`) makes the FIFO and holds it open read-write (so a ring never finds it
unopened while the waiter lives, and a read never sees end-of-file); `ring` opens it
write-only without blocking and writes one byte: nothing waits (ENXIO), nothing there
(ENOENT) or rung already and not yet heard (EAGAIN) are all fine, a ring never blocks the
ringer. A ring says only "look again": the waiter then reads the state it watches.
Standard library only (the stand-in imports it).
"""

from __future__ import annotations

import errno
import os
import select

# netd rings this when it records a link change of a sandbox (hanabi_netd.service); the
# sandbox's stand-in waits on it (hanabi_runtime.netfollow).
NET_CHANGES_BELL = "network.bell"


def ring(path: str | os.PathLike[str]) -> bool:
    """Ring the doorbell at `path`; True when a waiter will hear it (never blocks or raises)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False  # ENXIO: nobody waits; ENOENT: no doorbell; ELOOP: not ours
    try:
        os.write(fd, b"x")
        return True
    except BlockingIOError:
        return True  # full: rung already, not heard yet
    except OSError:
        return False
    finally:
        os.close(fd)


class Doorbell:
    """The waiting side: makes the FIFO at `path` (OSError when it cannot)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            os.mkfifo(self.path, 0o600)
        except FileExistsError:
            pass  # a waiter before this one (a restarted stand-in) made it
        self.fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
        if not _is_fifo(self.fd):
            os.close(self.fd)
            raise OSError(errno.EEXIST, f"{self.path} exists and is not a FIFO")

    def wait(self, timeout: float | None) -> bool:
        """Sleep until rung (True; every ring so far is heard at once) or `timeout` s (False)."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        try:
            while os.read(self.fd, 4096):
                pass
        except BlockingIOError:
            pass
        return True

    def close(self) -> None:
        """Stop waiting (the FIFO stays: it goes with the sandbox's directory)."""
        os.close(self.fd)


def _is_fifo(fd: int) -> bool:
    import stat

    return stat.S_ISFIFO(os.fstat(fd).st_mode)
