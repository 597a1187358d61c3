"""The host side of the guest's DNS relay: queries to a loopback resolver of the container.

Docker's embedded DNS server answers on 127.0.0.11 *inside the container's network
namespace*; a guest's 127.0.0.11 is the guest's own loopback, and the tc redirect sends
nothing to the namespace's stack. So the agent listens on that address in the guest and
forwards each UDP query as a `dns_query` event; agentd sends it to the same address,
port 53, from a socket made inside the namespace, and returns the answer as a
`dns_answer` event. The guest is untrusted: it can only reach the resolvers named when
the network was configured, in its own namespace; queries are size-checked, at most
MAX_PENDING per sandbox are in flight (the rest are dropped, as a busy resolver would),
and each exchange has a deadline.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from hanabi_common.errors import HanabiError
from hanabi_common.netns import call_in_netns
from hanabi_wire import T_DNS_ANSWER, b64e

log = logging.getLogger("hanabi.agentd.dns")
DNS_PORT = 53
MAX_PENDING = 32
EXCHANGE_TIMEOUT_S = 5.0
MAX_ANSWER = 4096  # UDP; over TCP an answer may take the whole 64 KiB its length prefix allows
WORKERS = 4


@dataclass(frozen=True)
class DnsTarget:
    """Where one sandbox's queries go: loopback resolvers inside its network namespace."""

    netns_path: str | None
    servers: tuple[str, ...]
    port: int = DNS_PORT


def exchange(netns_path: str | None, server: str, query: bytes, *, port: int = DNS_PORT,
             timeout: float = EXCHANGE_TIMEOUT_S, tcp: bool = False) -> bytes:
    """Send one query to `server`:`port` from a socket made in the namespace (None: this
    one), over UDP, or TCP with 2-byte length prefixes; the answer."""
    kind = socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM
    sock = call_in_netns(netns_path, lambda: socket.socket(socket.AF_INET, kind | socket.SOCK_CLOEXEC))
    try:
        sock.settimeout(timeout)
        sock.connect((server, port))
        if not tcp:
            sock.send(query)
            return sock.recv(MAX_ANSWER)
        sock.sendall(len(query).to_bytes(2, "big") + query)
        size = int.from_bytes(_read_exactly(sock, 2), "big")
        return _read_exactly(sock, size)
    finally:
        sock.close()


def _read_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("the resolver closed the connection mid-answer")
        data += chunk
    return data


class DnsRelay:
    """Runs the exchanges of every sandbox on a small thread pool."""

    def __init__(self, workers: int = WORKERS) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="agentd-dns")
        self._pending: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()  # answered, unanswered, dropped (for metrics)

    def submit(self, session, query) -> bool:
        """Relay a `GuestDnsQuery` of `session` (whose `dns_target` says where); False when
        it is dropped (no relay configured, a server not configured, too many in flight)."""
        target: DnsTarget | None = getattr(session, "dns_target", None)
        sid = session.sandbox_id
        if target is None or query.server not in target.servers:
            log.warning("dns query for a resolver that was not configured",
                        extra={"sandbox": sid, "server": query.server})
            self.counts["dropped"] += 1
            return False
        with self._lock:
            if self._pending[sid] >= MAX_PENDING:
                self.counts["dropped"] += 1
                return False
            self._pending[sid] += 1
        try:
            self._pool.submit(self._run, session, target, query)
        except RuntimeError:  # shutting down
            self._done(sid)
            return False
        return True

    def _done(self, sid: str) -> None:
        with self._lock:
            self._pending[sid] -= 1
            if self._pending[sid] <= 0:
                del self._pending[sid]

    def _run(self, session, target: DnsTarget, query) -> None:
        try:
            answer = exchange(target.netns_path, query.server, query.data, port=target.port, tcp=query.tcp)
            session.send_event(T_DNS_ANSWER, {"qid": query.qid, "data": b64e(answer)})
            self.counts["answered"] += 1
        except (OSError, HanabiError) as exc:
            self.counts["unanswered"] += 1
            log.info("dns query not answered", extra={"sandbox": session.sandbox_id, "server": query.server,
                                                      "error": str(exc)[:200]})
        finally:
            self._done(session.sandbox_id)

    def close(self) -> None:
        """Stop taking queries; exchanges in flight end by their deadline."""
        self._pool.shutdown(wait=False, cancel_futures=True)
