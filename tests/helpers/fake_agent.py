"""The guest side of one agent connection, for agentd tests that fake the in-guest agent.

`FakeAgent` decodes what the host sends with `FrameDecoder` and hands every message to a
`behave(agent, msg)` callback, after doing what the real agent (guest/hanabi_guest/agent.py)
does with the SYNC handshake: when the host's SYNC marker arrives it writes `hanabi_wire.SYNC`
before any later frame. The host (agentd) ignores every byte it receives before that answer.

Knobs for hostile or odd guests:
- `before_sync`: raw bytes written as soon as the connection opens, i.e. before the SYNC
  answer (what a guest still had queued for an earlier client, or garbage);
- `answer_sync=False`: never answer SYNC (the host then ignores everything this peer sends).

Sends are serialised with a lock, so the reader thread and the test may both send.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

from hanabi_wire import SYNC, T_SYNC_MARKER, FrameDecoder, ProtocolError, encode_frame

HEAD_KEPT = 64
Behave = Callable[["FakeAgent", dict], None]


class FakeAgent:
    """One connection of a fake guest agent, served by a daemon thread."""

    def __init__(self, sock: socket.socket, behave: Behave, *, before_sync: bytes = b"",
                 answer_sync: bool = True) -> None:
        self.sock = sock
        self.behave = behave
        self.before_sync = before_sync
        self.answer_sync = answer_sync
        self.seen: list[dict] = []  # the host's messages, SYNC markers left out
        self.syncs = 0  # SYNC markers received from the host
        self.head = bytearray()  # the first HEAD_KEPT bytes received, as they came
        self.synced = threading.Event()  # set once the host's SYNC was answered
        self._send_lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        decoder = FrameDecoder()  # the real agent's decoder: not wait_sync, SYNC resets it
        try:
            if self.before_sync:
                self.send_raw(self.before_sync)
            while data := self.sock.recv(65536):
                if len(self.head) < HEAD_KEPT:
                    self.head += data[:HEAD_KEPT - len(self.head)]
                try:
                    msgs = decoder.feed(data)
                except ProtocolError as exc:  # the agent then ignores input until SYNC
                    msgs = exc.messages
                for msg in msgs:
                    if msg.get("type") == T_SYNC_MARKER:
                        self.syncs += 1
                        if self.answer_sync:
                            self.send_raw(SYNC)
                            self.synced.set()
                        continue
                    self.seen.append(msg)
                    self.behave(self, msg)
        except OSError:
            pass

    def send_raw(self, data: bytes) -> None:
        """Write bytes as they are (SYNC, garbage, a torn frame)."""
        with self._send_lock:
            self.sock.sendall(data)

    def send(self, msg: dict) -> None:
        """Write one frame."""
        self.send_raw(encode_frame(msg))

    def reply(self, msg: dict, result: dict | None = None) -> None:
        self.send({"type": "reply", "id": msg["id"], "ok": True, "result": result or {}})

    def fail(self, msg: dict, code: str, message: str = "nope") -> None:
        self.send({"type": "reply", "id": msg["id"], "ok": False,
                   "error": {"code": code, "message": message}})

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class ListeningFakeAgent:
    """A Unix listening socket (like QEMU's chardev) serving each connection as a FakeAgent;
    `make_agent(sock)` builds the FakeAgent of a new connection."""

    def __init__(self, path: str, make_agent: Callable[[socket.socket], FakeAgent]) -> None:
        self.path = str(path)
        self.make_agent = make_agent
        self.agents: list[FakeAgent] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(self.path)
        self.server.listen(4)
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def connections(self) -> int:
        return len(self.agents)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.agents.append(self.make_agent(conn))

    def close(self) -> None:
        """Stop listening and hang up every connection (the socket file stays)."""
        self.server.close()
        for agent in self.agents:
            agent.close()
