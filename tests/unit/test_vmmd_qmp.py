"""The QMP client against a fake QMP server on a Unix socket (a protocol test, no qemu)."""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from collections.abc import Callable

import pytest

from hanabi_common.errors import DeadlineExceeded, FailedPrecondition, Internal, NotFound, Unavailable
from hanabi_vmmd.qmp import QmpClient, qmp_error

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, "capabilities": []}}
Script = Callable[[dict], list]


class FakeQmp:
    """Accepts one connection at a time; answers each command with what `script` returns.

    The script returns a list whose items are dicts (sent as JSON lines, `{"return": ...}`
    items get the request id), raw bytes (sent as they are) or floats (sleep that long).
    """

    def __init__(self, path: Path, script: Script, greeting: bytes | None = None) -> None:
        self.path = path
        self.script = script
        self.greeting = greeting if greeting is not None else json.dumps(GREETING).encode() + b"\r\n"
        self.received: list[dict] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                self._session(conn)

    def _session(self, conn: socket.socket) -> None:
        conn.sendall(self.greeting)
        reader = conn.makefile("rb")
        for line in reader:
            request = json.loads(line)
            self.received.append(request)
            for item in self.script(request):
                if isinstance(item, float):
                    time.sleep(item)
                elif isinstance(item, bytes):
                    conn.sendall(item)
                elif item == "close":
                    return
                else:
                    if ("return" in item or "error" in item) and "id" not in item and "id" in request:
                        item = {**item, "id": request["id"]}
                    conn.sendall(json.dumps(item).encode() + b"\r\n")

    def close(self) -> None:
        self.listener.close()


def default_script(request: dict) -> list:
    command = request["execute"]
    if command == "qmp_capabilities":
        return [{"return": {}}]
    if command == "query-status":
        return [{"event": "RESUME", "data": {}, "timestamp": {"seconds": 1, "microseconds": 0}},
                {"return": {"status": "running", "running": True}}]
    if command == "device_del":
        return [{"return": {}}, 0.05,
                {"event": "DEVICE_DELETED", "data": {"path": "/machine/peripheral/d1/virtio-backend"}},
                {"event": "DEVICE_DELETED", "data": {"device": request["arguments"]["id"],
                                                      "path": "/machine/peripheral/d1"}}]
    if command == "bad":
        return [{"error": {"class": "GenericError", "desc": "Duplicate nodes with node-name='n'"}}]
    if command == "missing":
        return [{"error": {"class": "DeviceNotFound", "desc": "Device 'x' not found"}}]
    if command == "nosuch":
        return [{"error": {"class": "CommandNotFound", "desc": "The command nosuch has not been found"}}]
    if command == "stale":
        return [{"return": "old", "id": "someone-else"}, {"return": "mine"}]
    if command == "silent":
        return []
    if command == "hangup":
        return ["close"]
    if command == "huge":
        return [b"x" * 3000]
    return [{"return": {}}]


@pytest.fixture
def sockdir():
    path = Path(tempfile.mkdtemp(prefix="qmp-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def server(sockdir):
    fake = FakeQmp(sockdir / "qmp.sock", default_script)
    yield fake
    fake.close()


def test_handshake_and_execute(server):
    with QmpClient(server.path, timeout=2) as qmp:
        assert qmp.greeting["QMP"]["version"]["qemu"]["major"] == 7
        assert qmp.execute("query-status") == {"status": "running", "running": True}
        assert [e["event"] for e in qmp.events] == ["RESUME"]
    commands = [r["execute"] for r in server.received]
    assert commands == ["qmp_capabilities", "query-status"]
    assert all(r["id"] for r in server.received)
    assert "arguments" not in server.received[1]


def test_arguments_are_sent(server):
    with QmpClient(server.path, timeout=2) as qmp:
        qmp.execute("blockdev-add", {"driver": "raw", "node-name": "n"})
    assert server.received[-1]["arguments"] == {"driver": "raw", "node-name": "n"}


def test_wait_event_matches_on_data(server):
    with QmpClient(server.path, timeout=2) as qmp:
        qmp.execute("device_del", {"id": "d1"})
        event = qmp.wait_event("DEVICE_DELETED", 2, match=lambda d: d.get("device") == "d1")
        assert event["data"]["path"] == "/machine/peripheral/d1"
        with pytest.raises(DeadlineExceeded):
            qmp.wait_event("DEVICE_DELETED", 0.2, match=lambda d: d.get("device") == "d1")


def test_errors_are_typed(server):
    with QmpClient(server.path, timeout=2) as qmp:
        with pytest.raises(FailedPrecondition, match="Duplicate nodes") as info:
            qmp.execute("bad")
        assert info.value.details == {"qmp_class": "GenericError", "command": "bad"}
        with pytest.raises(NotFound):
            qmp.execute("missing")
        with pytest.raises(Internal):
            qmp.execute("nosuch")
        assert qmp.execute("query-status")["running"]  # the session survives errors


def test_late_answers_to_other_ids_are_skipped(server):
    with QmpClient(server.path, timeout=2) as qmp:
        assert qmp.execute("stale") == "mine"


def test_timeout(server):
    with QmpClient(server.path, timeout=2) as qmp:
        began = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="silent"):
            qmp.execute("silent", timeout=0.3)
        assert time.monotonic() - began < 1.5


def test_hangup_is_unavailable(server):
    with QmpClient(server.path, timeout=2) as qmp:
        with pytest.raises(Unavailable, match="closed"):
            qmp.execute("hangup")


def test_oversized_line_is_refused(server):
    with QmpClient(server.path, timeout=2, max_line=1024) as qmp:
        with pytest.raises(Internal, match="over 1024 bytes"):
            qmp.execute("huge")


def test_no_socket_is_unavailable(sockdir):
    with pytest.raises(Unavailable):
        QmpClient(sockdir / "none.sock", timeout=1).connect()


def test_garbage_greeting(sockdir):
    fake = FakeQmp(sockdir / "g.sock", default_script, greeting=b"not json\n")
    try:
        with pytest.raises(Internal, match="invalid JSON"):
            QmpClient(fake.path, timeout=1).connect()
        fake.greeting = b'{"hello": 1}\n'
        with pytest.raises(Internal, match="no greeting"):
            QmpClient(fake.path, timeout=1).connect()
    finally:
        fake.close()


def test_silent_server_times_out_on_greeting(sockdir):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sockdir / "s.sock"))
    listener.listen(1)
    try:
        with pytest.raises(DeadlineExceeded, match="greeting"):
            QmpClient(sockdir / "s.sock", timeout=0.3).connect()
    finally:
        listener.close()


def test_qmp_error_mapping_of_odd_values():
    assert isinstance(qmp_error("x", "boom"), FailedPrecondition)
    assert isinstance(qmp_error("x", {"class": "KVMMissingCap", "desc": "d"}), Unavailable)
