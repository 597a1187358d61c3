"""Open a tap device that netd made inside a container's network namespace.

The tap is looked up by name in the namespace of the calling thread, so the open runs
in a thread that joined the namespace (`hanabi_common.netns.call_in_netns`); the file
descriptor works from anywhere afterwards. QEMU gets it on its command line (`fd=`) or
over QMP (`getfd`), so QEMU itself never enters the namespace.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct

from hanabi_common.errors import FailedPrecondition, InvalidArgument, NotFound
from hanabi_common.netns import call_in_netns

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16
TUN_DEVICE = "/dev/net/tun"


def ifreq(name: str, flags: int) -> bytes:
    """The struct ifreq TUNSETIFF takes: the name, NUL-padded, then the flags."""
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ:
        raise InvalidArgument(f"tap name {name!r} must be 1..{IFNAMSIZ - 1} bytes")
    return struct.pack(f"{IFNAMSIZ}sH22x", raw, flags)


def _open_here(name: str) -> int:
    fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, ifreq(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    except OSError as exc:
        os.close(fd)
        raise FailedPrecondition(f"cannot open tap {name}: {exc.strerror}") from None
    return fd


def open_tap(name: str, netns_path: str | None) -> int:
    """An fd attached to tap `name` in the namespace at `netns_path` (None: this one).

    Raises NotFound when no such tap exists there: TUNSETIFF would otherwise create a
    fresh, unwired tap with that name, so the name is checked first.
    """
    def opener() -> int:
        if not _link_exists(name):
            raise NotFound(f"tap {name} does not exist in network namespace {netns_path or '(host)'}")
        return _open_here(name)

    return call_in_netns(netns_path, opener)


def _link_exists(name: str) -> bool:
    """Whether this thread's namespace has a link `name` (not /sys: it shows the namespace
    sysfs was mounted in, and if_nametoindex asks through a socket made in this thread)."""
    try:
        socket.if_nametoindex(name)
        return True
    except OSError:
        return False
