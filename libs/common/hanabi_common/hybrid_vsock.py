"""The host side of Firecracker's hybrid vsock handshake, defined once (agentd's channel and
vmmd's agent probe both use it).

Firecracker exposes a VM's vsock device on the host as a Unix socket. A host-initiated
connection writes `CONNECT <port>\\n` and Firecracker answers `OK <host port>\\n` once a guest
listener on that port accepted; after the newline the stream belongs to the guest. When nothing
listens on the port, Firecracker closes the connection.
"""

from __future__ import annotations

import re
import socket
import time

HANDSHAKE_MAX = 64
_OK_LINE = re.compile(rb"^OK ([0-9]{1,10})\n$")


class HandshakeError(ConnectionError):
    """The hybrid vsock handshake failed (the port has no listener, or a garbled answer)."""


def connect_hybrid(path: str, port: int, timeout: float) -> tuple[socket.socket, int]:
    """A stream to guest vsock `port` through the Unix socket `path`, and the host port
    Firecracker gave it. OSError (FileNotFoundError, ConnectionRefusedError, TimeoutError,
    HandshakeError) when the VM or its listener is not there; the socket is closed then."""
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(f"CONNECT {port}\n".encode())
        line = bytearray()
        # Byte by byte: whatever follows the newline already belongs to the guest.
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("hybrid vsock handshake timed out")
            sock.settimeout(left)
            byte = sock.recv(1)
            if not byte:
                raise HandshakeError(f"no listener on vsock port {port} "
                                     "(connection closed during the handshake)")
            line += byte
            if len(line) > HANDSHAKE_MAX:
                raise HandshakeError("hybrid vsock handshake answer too long")
        match = _OK_LINE.match(bytes(line))
        if match is None:
            raise HandshakeError(f"unexpected hybrid vsock answer {bytes(line)[:HANDSHAKE_MAX]!r}")
        return sock, int(match.group(1))
    except BaseException:
        sock.close()
        raise
