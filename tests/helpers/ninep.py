"""A minimal 9P2000.L client for tests: enough to speak to a 9P server (diod) over a
stream socket the way the guest kernel's `trans=fd` client does (version, attach, walk,
lopen, read, getattr, lock), without a kernel that has 9P."""

from __future__ import annotations

import socket
import struct

NOTAG, NOFID = 0xFFFF, 0xFFFFFFFF
TLERROR_R = 7
TLOPEN, RLOPEN = 12, 13
TLOCK, RLOCK = 52, 53
LOCK_RDLCK, LOCK_WRLCK, LOCK_UNLCK = 0, 1, 2
LOCK_SUCCESS, LOCK_BLOCKED, LOCK_ERROR, LOCK_GRACE = 0, 1, 2, 3
O_RDWR = 2
TGETATTR, RGETATTR = 24, 25
TVERSION, RVERSION = 100, 101
TATTACH, RATTACH = 104, 105
TWALK, RWALK = 110, 111
TREAD, RREAD = 116, 117


class NinePError(Exception):
    """The server answered Rlerror (`errno`)."""

    def __init__(self, errno: int) -> None:
        super().__init__(f"Rlerror {errno}")
        self.errno = errno


def _s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<H", len(raw)) + raw


class NinePClient:
    """Request/response over `sock`, one tag at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.tag = 0

    def _recv_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError("the 9P server closed the connection")
            data += chunk
        return data

    def call(self, kind: int, body: bytes, tag: int | None = None) -> tuple[int, bytes]:
        if tag is None:
            self.tag = (self.tag + 1) % NOTAG
            tag = self.tag
        self.sock.sendall(struct.pack("<IBH", 7 + len(body), kind, tag) + body)
        size, rkind, rtag = struct.unpack("<IBH", self._recv_exact(7))
        payload = self._recv_exact(size - 7)
        assert rtag == tag, f"reply tag {rtag} for request tag {tag}"
        if rkind == TLERROR_R:
            raise NinePError(struct.unpack("<I", payload)[0])
        assert rkind == kind + 1, f"reply type {rkind} to request type {kind}"
        return rkind, payload

    def version(self, msize: int = 65536) -> str:
        _, payload = self.call(TVERSION, struct.pack("<I", msize) + _s("9P2000.L"), tag=NOTAG)
        (length,) = struct.unpack_from("<H", payload, 4)
        return payload[6:6 + length].decode()

    def attach(self, fid: int, aname: str, uid: int = 0, uname: str = "root") -> bytes:
        _, qid = self.call(TATTACH, struct.pack("<II", fid, NOFID) + _s(uname) + _s(aname) + struct.pack("<I", uid))
        return qid

    def walk(self, fid: int, newfid: int, names: list[str]) -> int:
        body = struct.pack("<IIH", fid, newfid, len(names)) + b"".join(_s(n) for n in names)
        _, payload = self.call(TWALK, body)
        return struct.unpack_from("<H", payload)[0]  # how many names were walked

    def read_file(self, fid: int, count: int = 4096) -> bytes:
        self.call(TLOPEN, struct.pack("<II", fid, 0))  # O_RDONLY
        _, payload = self.call(TREAD, struct.pack("<IQI", fid, 0, count))
        (n,) = struct.unpack_from("<I", payload)
        return payload[4:4 + n]

    def lopen(self, fid: int, flags: int = 0) -> None:
        self.call(TLOPEN, struct.pack("<II", fid, flags))

    def lock(self, fid: int, kind: int = LOCK_WRLCK, proc_id: int = 1, client_id: str = "guest") -> int:
        """Tlock of the whole file (what the guest kernel sends for flock(2)), not blocking;
        the server's status (LOCK_SUCCESS, LOCK_BLOCKED...)."""
        body = struct.pack("<IBIQQI", fid, kind, 0, 0, 0, proc_id) + _s(client_id)
        _, payload = self.call(TLOCK, body)
        return payload[0]
