"""A tiny authoritative DNS responder for tests: answers every A query with one address,
over UDP and over TCP (2-byte length prefixes).

Run as `python -m tests.helpers.dns_stub ADDRESS PORT ANSWER_IP` (inside a test-made
namespace, e.g. on 127.0.0.11:53 where Docker's embedded DNS would be); prints "ready".
"""

from __future__ import annotations

import socket
import struct
import sys
import threading


def answer(query: bytes, ip: str) -> bytes:
    """A response to `query` (one question) with one A record of `ip`, TTL 60."""
    qid, flags, qdcount = struct.unpack("!HHH", query[:6])
    end = 12
    while query[end] != 0:
        end += query[end] + 1
    question = query[12:end + 5]
    header = struct.pack("!HHHHHH", qid, 0x8180 | (flags & 0x0100), 1, 1, 0, 0)
    record = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton(ip)
    return header + question + record


def serve_tcp(listener: socket.socket, ip: str) -> None:
    """Answer one length-prefixed query per connection, then close it."""
    while True:
        conn, _ = listener.accept()
        with conn:
            head = conn.recv(2)
            if len(head) < 2:
                continue
            size, query = int.from_bytes(head, "big"), b""
            while len(query) < size:
                chunk = conn.recv(size - len(query))
                if not chunk:
                    break
                query += chunk
            if len(query) == size > 12:
                reply = answer(query, ip)
                conn.sendall(len(reply).to_bytes(2, "big") + reply)


def main() -> None:
    address, port, ip = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((address, port))
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((address, port))
    listener.listen(4)
    threading.Thread(target=serve_tcp, args=(listener, ip), daemon=True).start()
    print("ready", flush=True)
    while True:
        data, peer = sock.recvfrom(4096)
        if len(data) > 12:
            sock.sendto(answer(data, ip), peer)


if __name__ == "__main__":
    main()
