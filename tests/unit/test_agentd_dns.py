"""agentd's half of the guest DNS relay: what a guest may send as a dns_query, where it
may go, how many may be in flight, and a real UDP exchange on loopback."""

from __future__ import annotations

import base64
import socket
import threading

import pytest

from hanabi_agentd.dns import MAX_PENDING, DnsRelay, DnsTarget, exchange
from hanabi_agentd.guest_messages import GuestDnsQuery, GuestMisbehaved, parse_guest_message

QUERY = b"\x12\x34\x01\x00\x00\x01" + b"\x00" * 6 + b"\x04test\x00\x00\x01\x00\x01"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_a_valid_query_parses():
    msg = parse_guest_message({"type": "dns_query", "qid": 7, "server": "127.0.0.11", "data": b64(QUERY)})
    assert isinstance(msg, GuestDnsQuery) and msg.data == QUERY and msg.server == "127.0.0.11"


@pytest.mark.parametrize("fields", [
    {"server": "10.0.0.1"},                      # not loopback: the relay is no open proxy
    {"server": "127.0.0.11; rm -rf /"},
    {"data": b64(b"tiny")},                      # shorter than a DNS header
    {"data": b64(b"x" * 5000)},                  # over the limit
    {"data": "not base64!"},
    {"qid": -1}, {"qid": "7"}, {"qid": 1 << 40},
])
def test_bad_queries_are_refused(fields):
    msg = {"type": "dns_query", "qid": 7, "server": "127.0.0.11", "data": b64(QUERY), **fields}
    with pytest.raises(GuestMisbehaved):
        parse_guest_message(msg)


class Session:
    """What DnsRelay needs of an AgentSession: an id, a target and send_event."""

    def __init__(self, target: DnsTarget | None) -> None:
        self.sandbox_id = "sb"
        self.dns_target = target
        self.events: list[dict] = []
        self.sent = threading.Event()

    def send_event(self, kind: str, fields: dict) -> None:
        self.events.append({"type": kind, **fields})
        self.sent.set()


@pytest.fixture
def udp_server():
    """A loopback UDP 'resolver' answering every query with b'answer:' + query."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(4096)
            except OSError:
                continue
            sock.sendto(b"answer:" + data, peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield sock.getsockname()[1]
    stop.set()
    thread.join()
    sock.close()


def test_exchange_and_relay_round_trip(udp_server):
    assert exchange(None, "127.0.0.1", QUERY, port=udp_server) == b"answer:" + QUERY
    relay = DnsRelay()
    session = Session(DnsTarget(None, ("127.0.0.1",), port=udp_server))
    query = GuestDnsQuery(type="dns_query", qid=9, server="127.0.0.1", data=b64(QUERY))
    assert relay.submit(session, query)
    assert session.sent.wait(5)
    assert session.events == [{"type": "dns_answer", "qid": 9, "data": b64(b"answer:" + QUERY)}]
    relay.close()


def test_queries_go_only_where_configured_and_in_bounded_numbers():
    relay = DnsRelay(workers=1)
    query = GuestDnsQuery(type="dns_query", qid=1, server="127.0.0.11", data=b64(QUERY))
    assert not relay.submit(Session(None), query)                                 # no relay configured
    assert not relay.submit(Session(DnsTarget(None, ("127.0.0.12",))), query)     # another server
    # A resolver that never answers: MAX_PENDING queries wait, the next ones are dropped.
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.11", 0))
    session = Session(DnsTarget(None, ("127.0.0.11",), port=silent.getsockname()[1]))
    try:
        accepted = [relay.submit(session, query) for _ in range(MAX_PENDING + 5)]
        assert accepted.count(True) == MAX_PENDING and accepted[-1] is False
    finally:
        relay.close()
        silent.close()


def test_tcp_exchange_with_length_prefixes():
    """The TCP path (a truncated UDP answer makes clients ask again over TCP): a loopback
    TCP 'resolver' answering with a long, length-prefixed answer."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    answer = b"long answer " * 1000

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            size = int.from_bytes(conn.recv(2), "big")
            received = b""
            while len(received) < size:
                received += conn.recv(size - len(received))
            assert received == QUERY
            conn.sendall(len(answer).to_bytes(2, "big") + answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        assert exchange(None, "127.0.0.1", QUERY, port=server.getsockname()[1], tcp=True) == answer
    finally:
        thread.join(5)
        server.close()
    msg = parse_guest_message({"type": "dns_query", "qid": 1, "server": "127.0.0.11", "data": b64(QUERY), "tcp": True})
    assert msg.tcp is True
