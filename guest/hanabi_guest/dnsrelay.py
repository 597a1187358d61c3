"""The guest side of the DNS relay: a UDP listener on each loopback resolver address of
the container (Docker's 127.0.0.11), whose queries travel to the host as ``dns_query``
events and whose answers come back as ``dns_answer`` events (agentd asks the resolver
inside the container's network namespace; see services/agentd/hanabi_agentd/dns.py).

At most MAX_PENDING queries wait for an answer; older ones are forgotten after
PENDING_TTL_S (the client has retried or given up by then).

STDLIB ONLY: runs inside the guest.
"""

from __future__ import annotations

import itertools
import socket
import time

from . import protocol as P
from .core import log

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable

    from .poller import Poller

MAX_QUERY = 4096
MAX_PENDING = 64
PENDING_TTL_S = 10.0
DNS_PORT = 53


class DnsRelay:
    """Listeners and queries in flight."""

    def __init__(self, send: Callable[[dict[str, Any]], None], poller: Poller) -> None:
        self.send = send
        self.poller = poller
        self.sockets: dict[str, socket.socket] = {}
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
        return [f"{a}:{s.getsockname()[1]}" for a, s in self.sockets.items()]

    def _expire(self, now: float) -> None:
        for qid in [q for q, (_, _, when) in self.pending.items() if now - when > PENDING_TTL_S]:
            del self.pending[qid]

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
            now = time.monotonic()
            self._expire(now)
            if len(data) < 12 or len(self.pending) >= MAX_PENDING:
                continue  # not a DNS query, or too many in flight: dropped, the client retries
            qid = next(self.ids) & 0x7FFFFFFF
            self.pending[qid] = (sock, peer, now)
            self.send({"type": P.T_DNS_QUERY, "qid": qid, "server": address, "data": P.b64e(data)})

    def on_answer(self, msg: dict[str, Any]) -> None:
        """A ``dns_answer`` event from the host: send it to the client that asked."""
        entry = self.pending.pop(msg.get("qid"), None) if isinstance(msg.get("qid"), int) else None
        if entry is None:
            return  # expired, or never asked
        sock, peer, _ = entry
        try:
            sock.sendto(P.b64d(str(msg.get("data", ""))), peer)
        except (OSError, P.ProtocolError) as exc:
            log(f"dns answer dropped: {exc}")
