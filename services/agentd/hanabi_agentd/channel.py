"""Byte-stream transports between agentd and the in-guest agent.

A `Channel` connects (with a timeout), sends whole frames, receives raw bytes and closes.
Three transports exist:

- `UnixChannel`: QEMU's virtio-serial chardev socket (`server=on,wait=off`); agentd is the
  client. This is the one used on this host.
- `HybridVsockChannel`: Firecracker's vsock, exposed on the host as a Unix socket. After
  connecting, the host writes `CONNECT <port>\\n` and Firecracker answers `OK <hostport>\\n`
  before the stream belongs to the guest's listener on that port (`hanabi_common.hybrid_vsock`).
- `VsockChannel`: AF_VSOCK to `(cid, port)` through vhost-vsock.

`make_channel(address)` picks one from an address string: a plain absolute path (or
`unix://PATH`), `hvsock://PATH:PORT`, or `vsock://CID:PORT`.
"""

from __future__ import annotations

import errno
import re
import socket
import threading
from pathlib import Path
from typing import Literal

from hanabi_common.errors import InvalidArgument
from hanabi_common.hybrid_vsock import connect_hybrid

ChannelKind = Literal["unix", "hybrid-vsock", "vsock"]
RECV_CHUNK = 64 * 1024
_HVSOCK = re.compile(r"^hvsock://(/[^\x00]+):([0-9]{1,10})$")
_VSOCK = re.compile(r"^vsock://([0-9]{1,10}):([0-9]{1,10})$")
# Errors that mean "the peer is not there yet": retry until the deadline.
RETRYABLE = (FileNotFoundError, ConnectionRefusedError, ConnectionResetError,
             BrokenPipeError, socket.timeout)


class Channel:
    """A stream to the guest agent; subclasses only know how to open their socket."""

    kind: ChannelKind = "unix"

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._send_lock = threading.Lock()

    @property
    def address(self) -> str:
        """A printable address of the peer (for logs and state files)."""
        raise NotImplementedError

    def _open(self, timeout: float) -> socket.socket:
        raise NotImplementedError

    def connect(self, timeout: float) -> None:
        """(Re)connect; raises OSError (see RETRYABLE) when the peer is not there yet."""
        self.close()
        sock = self._open(max(timeout, 0.001))
        sock.settimeout(None)
        self._sock = sock

    @property
    def connected(self) -> bool:
        """Whether a socket is open (not whether the guest listens on it)."""
        return self._sock is not None

    def send(self, data: bytes) -> None:
        """Send bytes (one or more whole frames) atomically with respect to other senders."""
        sock = self._sock
        if sock is None:
            raise ConnectionError("channel is not connected")
        with self._send_lock:
            sock.sendall(data)

    def recv(self, size: int = RECV_CHUNK) -> bytes:
        """Block until bytes arrive; b"" at end of stream or after close()."""
        sock = self._sock
        if sock is None:
            return b""
        try:
            return sock.recv(size)
        except OSError as exc:
            if exc.errno in (errno.EBADF, errno.ENOTCONN, errno.ECONNRESET):
                return b""
            raise

    def close(self) -> None:
        """Close the socket; a thread blocked in recv() wakes up with b""."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()


class UnixChannel(Channel):
    """QEMU virtio-serial: the chardev's Unix socket, agentd connecting as a client."""

    kind: ChannelKind = "unix"

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = str(path)

    @property
    def address(self) -> str:
        return self.path

    def _open(self, timeout: float) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout)
            sock.connect(self.path)
        except BaseException:
            sock.close()
            raise
        return sock


class HybridVsockChannel(Channel):
    """Firecracker hybrid vsock: a Unix socket plus a `CONNECT port` / `OK hostport` line."""

    kind: ChannelKind = "hybrid-vsock"

    def __init__(self, path: str | Path, port: int) -> None:
        super().__init__()
        if not 0 < port < 1 << 32:
            raise InvalidArgument(f"vsock port {port} out of range")
        self.path = str(path)
        self.port = port
        self.host_port: int | None = None

    @property
    def address(self) -> str:
        return f"hvsock://{self.path}:{self.port}"

    def _open(self, timeout: float) -> socket.socket:
        sock, self.host_port = connect_hybrid(self.path, self.port, timeout)
        return sock


class VsockChannel(Channel):
    """vhost-vsock: an AF_VSOCK stream to the guest's (cid, port)."""

    kind: ChannelKind = "vsock"

    def __init__(self, cid: int, port: int) -> None:
        super().__init__()
        if not 3 <= cid < 1 << 32 or not 0 < port < 1 << 32:
            raise InvalidArgument(f"vsock address {cid}:{port} out of range")
        self.cid = cid
        self.port = port

    @property
    def address(self) -> str:
        return f"vsock://{self.cid}:{self.port}"

    def _open(self, timeout: float) -> socket.socket:
        family = getattr(socket, "AF_VSOCK", None)
        if family is None:
            raise InvalidArgument("this Python has no AF_VSOCK support")
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout)
            sock.connect((self.cid, self.port))
        except BaseException:
            sock.close()
            raise
        return sock


def make_channel(address: str) -> Channel:
    """Build the channel an address names (InvalidArgument if it names none)."""
    if address.startswith("unix://"):
        address = address[len("unix://"):]
    if address.startswith("/") and "\x00" not in address:
        return UnixChannel(address)
    if match := _HVSOCK.match(address):
        return HybridVsockChannel(match.group(1), int(match.group(2)))
    if match := _VSOCK.match(address):
        return VsockChannel(int(match.group(1)), int(match.group(2)))
    raise InvalidArgument(f"agent address {address[:200]!r} is none of: an absolute socket path, "
                          "unix://PATH, hvsock://PATH:PORT, vsock://CID:PORT")


def address_for(socket_path: str, transport: str = "unix", port: int | None = None) -> str:
    """The channel address for what vmmd reports (VmInfo.agent_socket, agent_transport,
    agent_port): the path itself for "unix", `hvsock://PATH:PORT` for Firecracker's hybrid
    vsock, `vsock://CID:PORT` for AF_VSOCK (socket_path "vsock://CID")."""
    if transport == "unix":
        return socket_path
    if port is None:
        raise InvalidArgument(f"agent transport {transport} needs a port")
    if transport == "hybrid_vsock":
        if not socket_path.startswith("/"):
            raise InvalidArgument(f"hybrid vsock socket {socket_path[:200]!r} must be an absolute path")
        return f"hvsock://{socket_path}:{port}"
    if transport == "vsock":
        if not socket_path.startswith("vsock://"):
            raise InvalidArgument(f"vsock agent address {socket_path[:200]!r} must be vsock://CID")
        return f"{socket_path}:{port}"
    raise InvalidArgument(f"unknown agent transport {transport!r}")
