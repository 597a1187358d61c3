"""Byte-stream channels between the in-guest agent and the host.

A channel is what the agent loop reads frames from and writes frames to. All channels are
non-blocking and expose the same small interface (``Channel``):

* ``fileno()``: the descriptor to watch for readability right now (it may change, e.g. a
  vsock listener vs. its accepted connection);
* ``read()``: bytes, ``None`` when nothing is available yet, ``b""`` when the peer is gone;
* ``write(data)``: the number of bytes accepted (0 when it would block or nobody listens);
* ``peer_gone()``: forget the current peer; ``retry_delay`` says how long the loop waits
  before watching ``fileno()`` again (< 0: the agent should stop).

``SerialChannel`` is a virtio-serial port (QEMU). While no host is connected to the port,
the guest kernel reports POLLHUP and reads return EOF: the loop backs off ``retry_delay``
(0.5 s) and looks again, but meanwhile watches the port edge-triggered, so the next host's
bytes wake it at once (the port's connect and data wake its poll queue): a VM without a host
costs a few wake-ups a second, a host that connects no wait.
``VsockChannel`` listens on AF_VSOCK port ``VSOCK_PORT`` (1024) and serves one connection at a time.
``FdChannel`` wraps an inherited stream socket (host-side tests); its EOF stops the agent.

STDLIB ONLY: runs inside the guest.
"""

from __future__ import annotations

import errno
import os
import stat
import time

from hanabi_wire.constants import (CHANNEL_SERIAL, CHANNEL_VSOCK, CMDLINE_CHANNEL, SERIAL_PORT_NAME,
                                   VSOCK_PORT)

from .sandbox import ensure_dev_node, find_sysfs_entry

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

READ_SIZE = 256 * 1024


class Channel:
    """Interface of an agent channel (see the module docstring)."""

    retry_delay: float = 0.05
    name: str = "channel"

    def fileno(self) -> int:
        raise NotImplementedError

    @property
    def connected(self) -> bool:
        """True when writes may reach a peer (writes are only attempted then)."""
        return True

    def read(self) -> bytes | None:
        raise NotImplementedError

    def write(self, data: bytes | memoryview) -> int:
        raise NotImplementedError

    def peer_gone(self) -> None:
        """The peer disconnected (or must be dropped); prepare for the next one."""

    def close(self) -> None:
        raise NotImplementedError


def _read_fd(fd: int) -> bytes | None:
    try:
        return os.read(fd, READ_SIZE)
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EINTR):
            return None
        if exc.errno in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.EIO):
            return b""
        raise


def _write_fd(fd: int, data: bytes | memoryview) -> int:
    try:
        return os.write(fd, data)
    except BlockingIOError:
        return 0
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EINTR, errno.EPIPE, errno.ECONNRESET, errno.EIO):
            return 0
        raise


def find_serial_port(name: str = SERIAL_PORT_NAME, sysfs: str = "/sys") -> str | None:
    """Return the /dev name (e.g. ``vport1p1``) of the virtio-serial port called ``name``."""
    return find_sysfs_entry(os.path.join(sysfs, "class/virtio-ports"), "name", name)


class FdChannel(Channel):
    """An inherited, already connected stream socket; the agent stops when it closes."""

    name = "fd"

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self.retry_delay = -1.0

    def fileno(self) -> int:
        return self.fd

    def read(self) -> bytes | None:
        return _read_fd(self.fd)

    def write(self, data: bytes | memoryview) -> int:
        return _write_fd(self.fd, data)

    def close(self) -> None:
        os.close(self.fd)


class SerialChannel(FdChannel):
    """A virtio-serial port opened O_RDWR | O_NONBLOCK."""

    name = "virtio-serial"

    def __init__(self, fd: int) -> None:  # opened non-blocking already; EOF means no host yet
        self.fd = fd
        self.retry_delay = 0.5

    @classmethod
    def open(cls, name: str = SERIAL_PORT_NAME, timeout: float = 10.0) -> SerialChannel:
        """Find the port called ``name`` (waiting up to ``timeout`` s) and open it."""
        deadline = time.monotonic() + timeout
        while True:
            port = find_serial_port(name)
            if port is not None:
                break
            if time.monotonic() >= deadline:
                raise RuntimeError(f"no virtio-serial port named {name!r} in /sys/class/virtio-ports")
            time.sleep(0.01)
        path = ensure_dev_node(port, "/sys/class/virtio-ports", stat.S_IFCHR)
        return cls(os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY))


class VsockChannel(Channel):
    """An AF_VSOCK listener (port VSOCK_PORT) serving one host connection at a time."""

    name = "vsock"

    def __init__(self, port: int = VSOCK_PORT, listener: Any = None) -> None:
        """Listen on AF_VSOCK ``port``, or serve an already listening socket (tests)."""
        if listener is None:
            import socket

            listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            listener.bind((socket.VMADDR_CID_ANY, port))
            listener.listen(1)
        self.listener = listener
        self.listener.setblocking(False)
        self.conn: Any = None
        self.retry_delay = 0.0

    def fileno(self) -> int:
        fd: int = (self.conn or self.listener).fileno()
        return fd

    @property
    def connected(self) -> bool:
        return self.conn is not None

    def read(self) -> bytes | None:
        if self.conn is None:
            try:
                conn, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return None
            conn.setblocking(False)
            self.conn = conn
            return None
        try:
            data: bytes = self.conn.recv(READ_SIZE)
            return data
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return b""

    def write(self, data: bytes | memoryview) -> int:
        if self.conn is None:
            return 0
        try:
            n: int = self.conn.send(data)
            return n
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            return 0

    def peer_gone(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def close(self) -> None:
        self.peer_gone()
        self.listener.close()


def kernel_cmdline_option(key: str, default: str, cmdline_path: str = "/proc/cmdline") -> str:
    """Return the value of ``key=value`` on the kernel command line, or ``default``."""
    try:
        with open(cmdline_path, encoding="utf-8") as f:
            words = f.read().split()
    except OSError:
        return default
    for word in words:
        k, sep, v = word.partition("=")
        if sep and k == key:
            return v
    return default


def open_guest_channel() -> Channel:
    """Open the channel selected by ``hanabi.channel=`` (``serial`` default, or ``vsock``)."""
    kind = kernel_cmdline_option(CMDLINE_CHANNEL, CHANNEL_SERIAL)
    if kind != CHANNEL_VSOCK:
        return SerialChannel.open()
    deadline = time.monotonic() + 10.0
    while True:  # the vsock modules may still be loading (init loads them in the background)
        try:
            return VsockChannel()
        except OSError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.01)
