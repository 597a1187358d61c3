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
from typing import Any, TypeVar
from collections.abc import Callable

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


def in_own_thread(func: Callable[[], T], name: str = "netns") -> T:
    """Run `func` in a fresh thread (whose namespace changes die with it); its result, or
    its exception raised here."""
    outcome: dict[str, Any] = {}

    def runner() -> None:
        try:
            outcome["value"] = func()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=runner, name=name, daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def call_in_netns(path: str | None, func: Callable[[], T]) -> T:
    """Run `func` in a thread inside the network namespace at `path` (None: here) and
    return its result or raise its exception. The path is checked first."""
    if path is None:
        return func()
    check_netns(path)

    def entered() -> T:
        enter_netns(path)
        return func()

    return in_own_thread(entered)


MS_BIND = 0x1000
MNT_DETACH = 0x2


def create_netns(path: str) -> None:
    """Make a new, empty network namespace and pin it with a bind mount at `path` (like
    `ip netns add`): a thread unshares its namespace and the namespace file of that thread
    is bind-mounted on an empty file. Raises OSError; a half-made file is removed."""
    target = Path(path)
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    os.close(fd)

    def unshare_and_pin() -> None:
        if _libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
        if _libc.mount(b"/proc/thread-self/ns/net", path.encode(), None, MS_BIND, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"bind mount of a new netns on {path}: {os.strerror(err)}")

    try:
        in_own_thread(unshare_and_pin, "netns-create")
    except BaseException:
        target.unlink(missing_ok=True)
        raise


def remove_netns(path: str) -> bool:
    """Unpin and remove a namespace made by `create_netns` (it dies with its last user);
    False when there was nothing at `path`."""
    if not os.path.lexists(path):
        return False
    if _libc.umount2(path.encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (22,):  # EINVAL: not a mount point (a half-made file)
            raise OSError(err, f"umount {path}: {os.strerror(err)}")
    Path(path).unlink(missing_ok=True)
    return True


class NetnsHolder:
    """A thread parked inside a network namespace, so that `/proc/<tid>/ns/net` names it.

    OCI prestart hooks get the container's pid and find its namespaces under /proc: for a
    VM there is no such process on the host, so (as Kata does) the hooks get the id of a
    thread that sits in the namespace until the hooks are done. Use as a context manager;
    `tid` is the thread's id.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.tid = 0
        self._entered = threading.Event()
        self._release = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="netns-holder", daemon=True)

    def _run(self) -> None:
        try:
            enter_netns(self.path)
            self.tid = threading.get_native_id()
        except BaseException as exc:  # noqa: BLE001 - reported by __enter__
            self._error = exc
        self._entered.set()
        if self._error is None:
            self._release.wait()

    def __enter__(self) -> NetnsHolder:
        check_netns(self.path)
        self._thread.start()
        self._entered.wait()
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *_exc: object) -> None:
        self._release.set()
        self._thread.join()
