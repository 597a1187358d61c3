"""The io socket (server) and IoStream (the stand-in's client) over a fake agent."""

from __future__ import annotations

import os
import select
import socket
import stat
import struct
import tempfile
import threading
import time

import pytest

from hanabi_agentd.io_server import IoServer, io_socket_path
from hanabi_agentd.iostream import IoError, IoStream, exit_status
from hanabi_agentd.process import ContainerRecord
from hanabi_agentd.session import AgentSession
from hanabi_common.config import AgentConfig, Config
from hanabi_wire import FrameDecoder, encode_frame

from tests.helpers.fake_agent import FakeAgent
from tests.unit.test_agentd_session import PING, PairChannel


def echo_agent(agent: FakeAgent, msg: dict) -> None:
    """start: pid 42; stdin: echoed as stdout; close_stdin: say bye on stderr, exit 5."""
    kind = msg["type"]
    where = {"container_id": msg.get("container_id"), "exec_id": msg.get("exec_id", "init")}
    if kind == "ping":
        agent.reply(msg, PING)
    elif kind == "start":
        agent.reply(msg, {"pid": 42})
    elif kind == "stdin":
        agent.send({"type": "output", **where, "stream": "stdout", "data": msg["data"]})
    elif kind == "close_stdin":
        agent.reply(msg)
        agent.send({"type": "output", **where, "stream": "stderr", "data": b"bye"})
        agent.send({"type": "exit", **where, "exit_code": 5, "signal": None})


@pytest.fixture
def rig():
    run_dir = tempfile.mkdtemp(prefix="hio", dir="/tmp")
    config = Config(run_dir=run_dir, agent=AgentConfig(ready_timeout_s=3, request_timeout_s=2))
    agents: list[FakeAgent] = []
    session = AgentSession("sb1", lambda: PairChannel(echo_agent, agents), config)
    session.connect()
    session.containers["c1"] = ContainerRecord("c1", session.new_process("c1", "init"))

    def resolve(sid, cid, eid):
        return session, session.process(cid, eid)

    server = IoServer(io_socket_path(config.run_dir), resolve)
    server.start()
    yield run_dir, session, agents
    server.stop()
    session.close()
    os.rmdir(run_dir)


def collect(stream: IoStream, timeout: float = 5.0) -> list[dict]:
    events: list[dict] = []
    stream._sock.settimeout(timeout)
    while not stream.exited:
        events += stream.read_events()
    return events


def test_socket_is_private(rig):
    run_dir, _, _ = rig
    mode = stat.S_IMODE(os.stat(io_socket_path(run_dir)).st_mode)
    assert mode == 0o600


def test_stdin_waits_for_start_then_output_and_exit_in_order(rig):
    run_dir, session, agents = rig
    stream = IoStream.attach(run_dir, "sb1", "c1", "init", timeout=2)
    stream.send_stdin(b"early\n")  # before start: held back, not lost
    time.sleep(0.2)
    assert not any(m["type"] == "stdin" for m in agents[0].seen)
    pid = session.request("start", {"container_id": "c1"})["pid"]
    session.process("c1", "init").mark_running(pid)
    stream.send_stdin(b"x" * 150_000)  # split into protocol-sized chunks
    stream.close_stdin()
    events = collect(stream)
    out = b"".join(e["data"] for e in events if e["type"] == "output" and e["stream"] == "stdout")
    err = b"".join(e["data"] for e in events if e["type"] == "output" and e["stream"] == "stderr")
    assert out == b"early\n" + b"x" * 150_000 and err == b"bye"
    assert events[-1] == {"type": "exit", "exit_code": 5, "signal": None}
    assert exit_status(events[-1]) == 5
    with pytest.raises(EOFError):
        stream.read_events()  # the server closes after the exit
    stream.close()


def test_attach_after_exit_gets_buffer_then_exit_at_once(rig):
    run_dir, session, agents = rig
    record = session.process("c1", "init")
    record.mark_running(42)
    agents[0].send({"type": "output", "container_id": "c1", "exec_id": "init", "stream": "stdout",
                    "data": b"before attach"})
    agents[0].send({"type": "exit", "container_id": "c1", "exec_id": "init", "exit_code": None, "signal": 9})
    deadline = time.monotonic() + 3
    while record.status != "stopped" and time.monotonic() < deadline:
        time.sleep(0.01)
    with IoStream.attach(run_dir, "sb1", "c1", timeout=2) as stream:
        time.sleep(0.2)  # everything is sent at once; attach must not swallow it
        readable, _, _ = select.select([stream], [], [], 2)
        assert readable == [stream]  # a select loop (the stand-in's) sees it
        events = collect(stream)
    assert events == [{"type": "output", "stream": "stdout", "data": b"before attach", "seq": None},
                      {"type": "exit", "exit_code": None, "signal": 9}]
    assert exit_status(events[-1]) == 137


def test_attach_errors(rig):
    run_dir, _, _ = rig
    with pytest.raises(IoError) as err:
        IoStream.attach(run_dir, "sb1", "nope", timeout=2)
    assert err.value.code == "NOT_FOUND"
    first = IoStream.attach(run_dir, "sb1", "c1", timeout=2)
    with pytest.raises(IoError) as err:
        IoStream.attach(run_dir, "sb1", "c1", timeout=2)
    assert err.value.code == "ALREADY_EXISTS"
    first.close()
    deadline = time.monotonic() + 3
    while True:  # once the server noticed, the process takes a new client (re-attach)
        try:
            IoStream.attach(run_dir, "sb1", "c1", timeout=2).close()
            break
        except IoError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    with pytest.raises(IoError) as err:
        IoStream.attach("/nonexistent-dir", "sb1", "c1", timeout=0.3)
    assert err.value.code == "UNAVAILABLE"


def raw_exchange(run_dir: str, payload: bytes) -> list[dict]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(3)
    sock.connect(str(io_socket_path(run_dir)))
    sock.sendall(payload)
    decoder, got = FrameDecoder(), []
    while data := sock.recv(65536):
        got += decoder.feed(data)
    sock.close()
    return got


@pytest.mark.parametrize("payload", [
    struct.pack(">I", 0x7FFFFFFF),  # 0xFF runs are lengths here: the io protocol has no SYNC
    struct.pack(">I", 0x7FFFFFFE),
    struct.pack(">I", 3) + b"{x}",
    encode_frame({"type": "stdin", "data": ""}),
    encode_frame({"type": "attach", "sandbox_id": "../x", "container_id": "c1", "exec_id": "init"}),
    encode_frame({"type": "attach", "sandbox_id": "sb1", "container_id": "c1", "exec_id": "init", "x": 1}),
])
def test_garbage_clients_get_an_error_and_the_server_survives(rig, payload):
    run_dir, _, _ = rig
    replies = raw_exchange(run_dir, payload)
    assert replies and replies[-1]["type"] == "error" and replies[-1]["code"] == "INVALID_ARGUMENT"
    IoStream.attach(run_dir, "sb1", "c1", timeout=2).close()


def test_bad_message_after_attach_drops_the_client(rig):
    run_dir, _, _ = rig
    attach = encode_frame({"type": "attach", "sandbox_id": "sb1", "container_id": "c1", "exec_id": "init"})
    bad = encode_frame({"type": "stdin", "data": "!!!"})
    replies = raw_exchange(run_dir, attach + bad)
    assert [r["type"] for r in replies] == ["attached", "error"]


def test_relay_pumps_fds_and_returns_the_status(rig):
    run_dir, session, _ = rig
    stream = IoStream.attach(run_dir, "sb1", "c1", timeout=2)
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    result = []
    relay = threading.Thread(target=lambda: result.append(stream.relay(in_r, out_w, err_w)))
    relay.start()
    session.process("c1", "init").mark_running(session.request("start", {"container_id": "c1"})["pid"])
    os.write(in_w, b"hello relay\n")
    os.close(in_w)
    relay.join(5)
    assert result == [5]
    os.close(out_w)
    os.close(err_w)
    assert os.read(out_r, 100) == b"hello relay\n" and os.read(err_r, 100) == b"bye"
    for fd in (in_r, out_r, err_r):
        os.close(fd)
    stream.close()


def test_reattach_retries_while_agentd_is_unavailable_and_stops_at_not_found(tmp_path):
    """A restarting agentd may refuse an attach with UNAVAILABLE for a while: the stand-in
    tries again (backoff) and gets through; NOT_FOUND is final."""
    from hanabi_agentd.iostream import IO_SOCKET_NAME

    path = tmp_path / IO_SOCKET_NAME
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)
    answers = [{"type": "error", "code": "UNAVAILABLE", "message": "restoring"}] * 2 + [{"type": "attached"}]

    def serve(answers: list[dict]) -> None:
        for answer in answers:
            conn, _ = listener.accept()
            with conn:
                FrameDecoder(sync=False).feed(conn.recv(65536))
                conn.sendall(encode_frame(answer))
                if answer["type"] == "attached":
                    conn.recv(1)  # hold the connection until the client drops it

    server = threading.Thread(target=serve, args=(answers,), daemon=True)
    server.start()
    stream = IoStream(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
    stream._target = (str(tmp_path), "sb1", "c1", "init")
    stream.reattach(timeout=10)
    stream.close()
    server.join(5)
    assert not server.is_alive()

    server = threading.Thread(target=serve, args=([{"type": "error", "code": "NOT_FOUND", "message": "gone"}],),
                              daemon=True)
    server.start()
    started = time.monotonic()
    with pytest.raises(IoError) as caught:
        stream.reattach(timeout=10)
    assert caught.value.code == "NOT_FOUND" and time.monotonic() - started < 5
    listener.close()


def test_oom_reaches_the_init_client_before_the_exit_once_per_growth(rig):
    """The guest's `oom` (count so far) comes to the stand-in's `on_oom` before the exit of
    the process it killed; a repeat (replay) or a count for another container does nothing."""
    run_dir, session, agents = rig
    record = session.process("c1", "init")
    record.mark_running(42)
    heard: list[tuple[int, bool]] = []
    with IoStream.attach(run_dir, "sb1", "c1", timeout=2) as stream:
        stream.on_oom = lambda count: heard.append((count, stream.exited is None))
        where = {"container_id": "c1"}
        agents[0].send({"type": "oom", **where, "oom_kills": 1, "seq": 1})
        agents[0].send({"type": "oom", **where, "oom_kills": 1, "seq": 1})  # replayed
        agents[0].send({"type": "oom", "container_id": "other", "oom_kills": 5})
        agents[0].send({"type": "oom", **where, "oom_kills": 2, "seq": 2})
        agents[0].send({"type": "exit", **where, "exec_id": "init", "exit_code": None, "signal": 9, "seq": 3})
        events = collect(stream)
    assert events == [{"type": "exit", "exit_code": None, "signal": 9}]
    # One or two calls (2 may come coalesced with 1), the last with the count 2, all before the exit.
    assert heard[-1] == (2, True) and all(before for _, before in heard) and len(heard) <= 2
    assert record.oom_kills == 2


@pytest.mark.parametrize("count", [0, -1, "1", True, 1 << 63])
def test_a_bad_oom_count_from_the_guest_is_dropped(rig, count):
    run_dir, session, agents = rig
    record = session.process("c1", "init")
    agents[0].send({"type": "oom", "container_id": "c1", "oom_kills": count})
    agents[0].send({"type": "oom", "container_id": "c1", "oom_kills": 3})
    deadline = time.monotonic() + 3
    while record.oom_kills != 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert record.oom_kills == 3
