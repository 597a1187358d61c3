"""Network namespaces by path: check one, run code inside one, spawn a process into one.

A network namespace belongs to a thread, not to a process: `call_in_netns` runs a
function in a fresh thread that has joined the namespace with setns(2), so the caller's
own thread (and every other thread of the daemon) stays where it was. Sockets and tap
file descriptors opened inside keep their namespace after the thread is gone, which is
how netd makes netlink sockets and vmmd opens taps in a container's namespace.
Python 3.11 has no os.setns: libc's is called through ctypes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import threading
from pathlib import Path
from typing import Callable, TypeVar

from hanabi_common.errors import InvalidArgument

CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703  # ioctl on a namespace file: its CLONE_NEW* type
T = TypeVar("T")
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def check_netns(path: str) -> None:
    """Raise InvalidArgument unless `path` is an absolute path to a network namespace (nsfs)."""
    target = Path(path)
    if not target.is_absolute():
        raise InvalidArgument(f"netns path {path!r} must be absolute")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InvalidArgument(f"netns path {path} does not exist") from None
    except OSError as exc:
        raise InvalidArgument(f"netns path {path}: {exc.strerror}") from None
    try:
        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        kind = None  # not a namespace file at all
    finally:
        os.close(fd)
    if kind != CLONE_NEWNET:
        raise InvalidArgument(f"{path} is not a network namespace")


def setns_fd(fd: int) -> None:
    """Move the calling thread into the network namespace open at `fd` (OSError on failure)."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def enter_netns(path: str) -> None:
    """Move the calling thread into the network namespace at `path` (for a child's pre-exec)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns_fd(fd)
    finally:
        os.close(fd)


def call_in_netns(path: str | None, func: Callable[[], T]) -> T:
    """Run `func` in a thread inside the network namespace at `path` (None: here) and
    return its result or raise its exception. The path is checked first."""
    if path is None:
        return func()
    check_netns(path)
    outcome: dict[str, object] = {}

    def runner() -> None:
        try:
            enter_netns(path)
            outcome["value"] = func()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=runner, name="netns", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


def netns_id(path: str) -> str:
    """The namespace's identity, 'net:[inode]' (bind mounts of one namespace share it)."""
    return f"net:[{os.stat(path).st_ino}]"
