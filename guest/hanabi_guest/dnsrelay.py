"""The guest side of the DNS relay: UDP and TCP listeners on each loopback resolver
address of the container (Docker's 127.0.0.11), whose queries travel to the host as
``dns_query`` events (``tcp`` true for the TCP ones, which clients use when an answer was
truncated) and whose answers come back as ``dns_answer`` events (agentd asks the resolver
inside the container's network namespace; see services/agentd/hanabi_agentd/dns.py).

At most MAX_PENDING queries wait for an answer; older ones are forgotten after
PENDING_TTL_S (the client has retried or given up by then). At most MAX_TCP_CLIENTS TCP
connections are open; each carries 2-byte length-prefixed messages (RFC 1035 4.2.2).

STDLIB ONLY: runs inside the guest.
"""

from __future__ import annotations

import itertools
import socket
import time

import hanabi_wire as P

from .core import log

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any
    from collections.abc import Callable

    from .poller import Poller

MAX_QUERY = 4096
MAX_PENDING = 64
MAX_TCP_CLIENTS = 16
TCP_SEND_TIMEOUT_S = 2.0
PENDING_TTL_S = 10.0
DNS_PORT = 53


class DnsRelay:
    """Listeners and queries in flight."""

    def __init__(self, send: Callable[[dict[str, Any]], None], poller: Poller) -> None:
        self.send = send
        self.poller = poller
        self.sockets: dict[str, socket.socket] = {}
        self.listeners: dict[str, socket.socket] = {}
        self.clients: dict[int, tuple[socket.socket, bytearray]] = {}
        self.half_closed: set[int] = set()  # clients that sent EOF: closed once answered
        self.pending: dict[int, tuple[socket.socket, Any, float]] = {}
        self.ids = itertools.count(1)

    def listen(self, addresses: list[str], port: int = DNS_PORT) -> list[str]:
        """Listen on every address not listened on yet; "address:port" of each listener."""
        from .poller import EVENT_READ

        for address in addresses:
            if address in self.sockets:
                continue
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
            try:
                sock.bind((address, port))
            except OSError:
                sock.close()
                raise
            self.sockets[address] = sock
            self.poller.register(sock.fileno(), EVENT_READ, lambda mask, a=address: self._on_query(a))
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind((address, sock.getsockname()[1]))
                listener.listen(8)
            except OSError:
                listener.close()
                raise
            self.listeners[address] = listener
            self.poller.register(listener.fileno(), EVENT_READ, lambda mask, a=address: self._on_connect(a))
        return [f"{a}:{s.getsockname()[1]}" for a, s in self.sockets.items()]

    def _ask(self, reply_to: socket.socket, peer: Any, address: str, data: bytes, tcp: bool) -> None:
        """Send one query to the host, remembering where its answer goes."""
        now = time.monotonic()
        self._expire(now)
        if len(data) < 12 or len(self.pending) >= MAX_PENDING:
            return  # not a DNS message, or too many in flight: dropped, the client retries
        qid = next(self.ids) & 0x7FFFFFFF
        self.pending[qid] = (reply_to, peer, now)
        msg = {"type": P.T_DNS_QUERY, "qid": qid, "server": address, "data": P.b64e(data)}
        if tcp:
            msg["tcp"] = True
        self.send(msg)

    def _on_connect(self, address: str) -> None:
        from .poller import EVENT_READ

        try:
            conn, _ = self.listeners[address].accept()
        except (BlockingIOError, InterruptedError):
            return
        if len(self.clients) >= MAX_TCP_CLIENTS:
            conn.close()
            return
        conn.setblocking(False)
        fd = conn.fileno()
        self.clients[fd] = (conn, bytearray())
        self.poller.register(fd, EVENT_READ, lambda mask, fd=fd, a=address: self._on_tcp(fd, a))

    def _close_client(self, fd: int) -> None:
        conn, _ = self.clients.pop(fd, (None, None))
        if conn is not None:
            if fd not in self.half_closed:
                self.poller.unregister(fd)
            conn.close()
        self.half_closed.discard(fd)

    def _on_tcp(self, fd: int, address: str) -> None:
        conn, buf = self.clients[fd]
        try:
            chunk = conn.recv(MAX_QUERY + 2)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:  # the client is done sending (nc half-closes): answer it first, then close
            self.poller.unregister(fd)
            self.half_closed.add(fd)
            self._close_if_answered(fd)
            return
        buf += chunk
        while len(buf) >= 2:
            size = int.from_bytes(buf[:2], "big")
            if size > MAX_QUERY:
                self._close_client(fd)
                return
            if len(buf) < 2 + size:
                break
            query = bytes(buf[2:2 + size])
            del buf[:2 + size]
            self._ask(conn, None, address, query, tcp=True)

    def _expire(self, now: float) -> None:
        for qid in [q for q, (_, _, when) in self.pending.items() if now - when > PENDING_TTL_S]:
            del self.pending[qid]
        for fd in list(self.half_closed):
            self._close_if_answered(fd)

    def _close_if_answered(self, fd: int) -> None:
        """Close a half-closed TCP client once no answer is owed to it."""
        conn = self.clients.get(fd, (None,))[0]
        if conn is None or not any(sock is conn for sock, _, _ in self.pending.values()):
            self._close_client(fd)

    def _on_query(self, address: str) -> None:
        sock = self.sockets[address]
        for _ in range(16):  # drain a burst, but let the loop breathe
            try:
                data, peer = sock.recvfrom(MAX_QUERY)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log(f"dns relay {address}: {exc}")
                return
            self._ask(sock, peer, address, data, tcp=False)

    def on_answer(self, msg: dict[str, Any]) -> None:
        """A ``dns_answer`` event from the host: send it to the client that asked."""
        entry = self.pending.pop(msg["qid"], None)
        if entry is None:
            return  # expired, or never asked
        sock, peer, _ = entry
        try:
            answer = msg["data"]
            if peer is not None:
                sock.sendto(answer, peer)
            elif self.clients.get(sock.fileno(), (None,))[0] is sock and len(answer) <= 0xFFFF:
                sock.settimeout(TCP_SEND_TIMEOUT_S)  # a small answer: written at once, or the client goes
                try:
                    sock.sendall(len(answer).to_bytes(2, "big") + answer)
                finally:
                    sock.setblocking(False)
                if sock.fileno() in self.half_closed:
                    self._close_if_answered(sock.fileno())
        except (OSError, P.ProtocolError) as exc:
            log(f"dns answer dropped: {exc}")
            if peer is None and sock.fileno() in self.clients:
                self._close_client(sock.fileno())
