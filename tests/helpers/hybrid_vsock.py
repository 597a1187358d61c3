"""The host side of Firecracker's hybrid vsock, for tests: a Unix socket where a client
writes `CONNECT <port>\\n`, gets `OK <host port>\\n` when a guest listener exists for that
port, and then owns a byte stream to it; an unknown port gets its connection closed (what
Firecracker does when nothing listens in the guest).

Here a "guest listener" is a Unix socket path standing in for an AF_VSOCK port: the relay
connects to it and copies bytes both ways, as Firecracker's vsock muxer does between the
host socket and the guest's virtio-vsock queue.
"""

from __future__ import annotations

import re
import socket
import threading

_CONNECT = re.compile(rb"^CONNECT ([0-9]{1,10})\n$")
FIRST_HOST_PORT = 1 << 30  # Firecracker numbers host-initiated connections from 2^30 up


class HybridVsockRelay:
    """Listens on `path`; `ports` maps guest vsock ports to the Unix paths standing for them."""

    def __init__(self, path: str, ports: dict[int, str]) -> None:
        self.path = path
        self.ports = ports
        self.requests: list[bytes] = []  # every handshake line received, as it came
        self._next = FIRST_HOST_PORT
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(8)
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.server.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        line = b""
        while not line.endswith(b"\n") and len(line) < 64:
            byte = conn.recv(1)
            if not byte:
                conn.close()
                return
            line += byte
        self.requests.append(line)
        match = _CONNECT.match(line)
        target = self.ports.get(int(match.group(1))) if match else None
        if target is None:
            conn.close()
            return
        guest = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            guest.connect(target)
        except OSError:
            guest.close()
            conn.close()
            return
        self._next += 1
        conn.sendall(f"OK {self._next}\n".encode())
        threading.Thread(target=_pump, args=(guest, conn), daemon=True).start()
        _pump(conn, guest)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy src -> dst until either side ends; then end both (a vsock reset)."""
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    for sock in (src, dst):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
