"""A lean RPC client for the CLI's hot paths: the hanabi envelope over ZMTP 3.0, stdlib only.

pyzmq and pydantic cost more to import than a whole `state` call may take, so this client
speaks ZeroMQ's wire protocol (ZMTP 3.0, NULL mechanism, RFC 23) itself, as a DEALER, on
the daemons' `ipc://` Unix sockets, one connection per try (through `_socket`: `socket.py`
costs a few ms of enum building). The envelope (frames, header fields, errors, deadlines,
the Lazy Pirate tries of idempotent calls) is `hanabi_common.rpc.wire`'s, the same the
pyzmq client and the daemons use.
"""

from __future__ import annotations

import _socket
import json
import struct
import time

from hanabi_common.rpc.wire import (attempt_share, attempts_for, default_sender, ipc_down, no_answer, not_running,
                                    reply_error, request_frames, request_header, split_reply)

# ZMTP 3.0 greeting: signature, version 3.0, mechanism NULL, as-server 0, filler.
GREETING = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31
GREETING_SIZE = 64
MORE, LONG, COMMAND = 0x01, 0x02, 0x04
RECONNECT_S = 0.02  # between connection attempts while a daemon's socket refuses


class ProtocolError(Exception):
    """The peer does not speak ZMTP 3 as expected (the try is given up)."""


def _frame(flags: int, data: bytes) -> bytes:
    if len(data) > 255:
        return bytes([flags | LONG]) + struct.pack(">Q", len(data)) + data
    return bytes([flags, len(data)]) + data


def _ready_command(socket_type: bytes) -> bytes:
    name, value = b"Socket-Type", socket_type
    body = b"\x05READY" + bytes([len(name)]) + name + struct.pack(">I", len(value)) + value
    return _frame(COMMAND, body)


def _read_exact(sock: _socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ProtocolError("connection closed by the daemon")
        data += chunk
    return bytes(data)


def _read_frame(sock: _socket.socket) -> tuple[int, bytes]:
    flags = _read_exact(sock, 1)[0]
    if flags & LONG:
        (size,) = struct.unpack(">Q", _read_exact(sock, 8))
    else:
        size = _read_exact(sock, 1)[0]
    return flags, _read_exact(sock, size)


def _read_message(sock: _socket.socket) -> list[bytes]:
    frames = []
    while True:
        flags, data = _read_frame(sock)
        if flags & COMMAND:
            continue  # nothing after READY concerns a NULL-mechanism DEALER
        frames.append(data)
        if not flags & MORE:
            return frames


def _handshake(sock: _socket.socket) -> None:
    sock.sendall(GREETING + _ready_command(b"DEALER"))
    greeting = _read_exact(sock, GREETING_SIZE)
    if greeting[0] != 0xFF or greeting[9] != 0x7F or greeting[10] < 3:
        raise ProtocolError("the daemon's greeting is not ZMTP 3")
    flags, body = _read_frame(sock)
    if not flags & COMMAND or not body.startswith(b"\x05READY"):
        raise ProtocolError(f"the daemon refused the handshake: {body[:64]!r}")


class LeanClient:
    """Calls one daemon's methods with plain dicts; raises the typed hanabi errors."""

    def __init__(self, name: str, socket_path: str, *, timeout: float) -> None:
        self.name = name
        self.socket_path = socket_path
        self.timeout = timeout
        self.sender = default_sender()

    def call(self, method: str, body: dict | None = None, *, timeout: float | None = None,
             idempotent: bool = False) -> dict:
        """Call `method`; its reply body, or the typed error the daemon answered."""
        why = ipc_down(self.socket_path)  # as the typed client: a killed daemon's socket file stays
        if why is not None:
            raise not_running(self.name, why)
        total = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + total
        attempts = attempts_for(idempotent)
        for attempt in range(attempts):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            result = self._attempt(method, body or {}, attempt_share(remaining, attempt, attempts))
            if result is not None:
                return result
        raise no_answer(self.name, method, total)

    def _connect(self, end: float) -> _socket.socket | None:
        while True:
            sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
            try:
                sock.settimeout(max(end - time.monotonic(), 0.001))
                sock.connect(self.socket_path)
                return sock
            except (ConnectionRefusedError, FileNotFoundError):
                sock.close()
                if time.monotonic() + RECONNECT_S >= end:
                    return None
                time.sleep(RECONNECT_S)  # the daemon is (re)starting: ZeroMQ reconnects too
            except OSError:
                sock.close()
                return None

    def _attempt(self, method: str, body: dict, timeout: float) -> dict | None:
        end = time.monotonic() + timeout
        header = request_header(method, timeout, self.sender)
        sock = self._connect(end)
        if sock is None:
            return None
        try:
            _handshake(sock)
            frames = [b""] + request_frames(json.dumps(header).encode(), body)
            sock.sendall(b"".join(_frame(MORE if i < len(frames) - 1 else 0, f) for i, f in enumerate(frames)))
            while True:
                sock.settimeout(max(end - time.monotonic(), 0.001))
                answer = _read_message(sock)
                if answer and answer[0] == b"":
                    answer = answer[1:]
                reply_header, reply_body = split_reply(answer)
                if reply_header.get("parent_id") not in (header["msg_id"], ""):
                    continue
                if reply_header.get("status") == "error":
                    raise reply_error(self.name, reply_body)
                if reply_header.get("status") != "ok":
                    from hanabi_common.errors import InvalidArgument
                    raise InvalidArgument(f"malformed reply header: status {reply_header.get('status')!r}")
                return reply_body
        except (TimeoutError, ProtocolError, ConnectionError):
            return None
        finally:
            sock.close()
