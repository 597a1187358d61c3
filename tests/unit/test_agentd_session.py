"""AgentSession against a fake agent on a socketpair: SYNC handshake, correlation, timeouts,
misbehaviour. The fake agent (tests/helpers/fake_agent.py) answers the host's SYNC like the
real one; agentd ignores every byte the guest sends before that answer."""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time

import pytest

from hanabi_agentd.channel import Channel
from hanabi_agentd.process import ContainerRecord, ExitEvent, OutputEvent
from hanabi_agentd.session import AgentSession
from hanabi_common.config import AgentConfig, Config
from hanabi_common.errors import (AlreadyExists, DeadlineExceeded, FailedPrecondition, Internal,
                                  NotFound, Unavailable)
from hanabi_wire import MAX_FRAME, PROTOCOL_VERSION, SYNC, encode_frame

from tests.helpers.fake_agent import FakeAgent

PING = {"agent_version": "0.1.0", "kernel": "6.1.0-test", "uptime_s": 1.5, "protocol": PROTOCOL_VERSION}


def ping_only(agent: FakeAgent, msg: dict) -> None:
    if msg.get("type") == "ping":
        agent.reply(msg, PING)


class PairChannel(Channel):
    """A channel whose 'connect' makes a socketpair with a fresh FakeAgent on the far end."""

    def __init__(self, behave, agents: list, fake: dict | None = None) -> None:
        super().__init__()
        self.behave, self.agents, self.fake = behave, agents, fake or {}

    @property
    def address(self) -> str:
        return "socketpair"

    def _open(self, timeout: float) -> socket.socket:
        ours, theirs = socket.socketpair()
        self.agents.append(FakeAgent(theirs, self.behave, **self.fake))
        return ours


def make_config(tmp_path, **agent) -> Config:
    settings = {"ready_timeout_s": 3.0, "request_timeout_s": 0.5, "output_buffer_bytes": 4096}
    settings.update(agent)
    return Config(run_dir=tmp_path, agent=AgentConfig(**settings))


@pytest.fixture
def make_session(tmp_path):
    sessions = []

    def build(behave=ping_only, connect=True, fake=None, **agent):
        """`fake`: FakeAgent options (before_sync, answer_sync) for every new connection;
        the dict is read at each connection, so a test may change it between connects."""
        agents: list[FakeAgent] = []
        changes: list[int] = []
        session = AgentSession("sb1", lambda: PairChannel(behave, agents, fake), make_config(tmp_path, **agent),
                               on_change=lambda: changes.append(1))
        session.agents, session.changes = agents, changes  # type: ignore[attr-defined]  # test handles on the session
        sessions.append(session)
        if connect:
            session.connect()
        return session

    yield build
    for session in sessions:
        session.close()


def add_container(session, cid="c1", status="running"):
    record = ContainerRecord(cid, session.new_process(cid, "init"))
    if status == "running":
        record.init.mark_running(10)
    session.containers[cid] = record
    return record.init


def wait_for(predicate, timeout=3.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_connect_pings_and_records_the_agent(make_session):
    session = make_session()
    assert session.connected and session.info.kernel == "6.1.0-test"
    assert session.ready_s is not None and session.ready_s < 3
    agent = session.agents[0]
    assert agent.syncs == 1 and agent.synced.is_set()  # the host's SYNC came, and was answered
    assert len(session.agents) == 1


def test_host_writes_sync_before_its_first_frame(make_session):
    session = make_session()
    head = bytes(session.agents[0].head)
    assert head[:len(SYNC)] == SYNC  # the very first bytes on the wire
    assert head[len(SYNC)] == 0  # then a frame header (the first ping)


def test_connect_retries_until_the_guest_opens_its_port(make_session):
    calls = {"pings": 0}

    def late(agent, msg):
        calls["pings"] += 1
        if calls["pings"] >= 3:  # the first pings fall on a port nobody reads yet
            agent.reply(msg, PING)

    session = make_session(late)
    assert session.connected and calls["pings"] >= 3


def test_connect_gives_up_with_deadline_exceeded(make_session):
    session = make_session(lambda a, m: None, connect=False)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        session.connect(timeout=0.8)
    assert time.monotonic() - started < 2.5
    assert not session.connected


def test_connect_fails_fast_when_the_guest_breaks_framing(make_session):
    # After its SYNC answer the guest answers the ping with a zero length prefix. (Bytes of
    # 0xFF would not do: a run of them is a SYNC marker, see the resync test below.)
    session = make_session(lambda a, m: a.send_raw(b"\x00\x00\x00\x00"), connect=False)
    started = time.monotonic()
    with pytest.raises(Unavailable, match="protocol"):
        session.connect(timeout=3)
    assert time.monotonic() - started < 1.5
    assert session.agents[0].synced.is_set()


def test_guest_bytes_before_its_sync_answer_are_ignored(make_session, caplog):
    stale = (encode_frame({"type": "reply", "id": 1, "ok": True, "result": {"pid": 666}})
             + encode_frame({"type": "protocol_error", "message": "stale"})
             + encode_frame({"type": "surprise"})
             + b"\x00\x00\x00\x00"  # a zero length prefix
             + struct.pack(">I", 0x7FFFFFFE)  # an oversized one
             + struct.pack(">I", 5) + b"{bad}"  # not JSON
             + encode_frame({"type": "ready", "agent_version": "0", "kernel": "k"})[:9])  # torn
    caplog.set_level(logging.INFO, logger="hanabi.agentd")
    session = make_session(fake={"before_sync": stale})
    assert session.connected and session.info.kernel == "6.1.0-test"
    assert len(session.agents) == 1  # neither the garbage nor the protocol_error dropped it
    assert session.request("ping", {})["agent_version"] == "0.1.0"
    assert "dropped a message from the guest" not in caplog.text
    assert "protocol error" not in caplog.text and "dropping the connection" not in caplog.text


def test_guest_that_never_answers_sync_is_not_heard(make_session, caplog):
    # A hostile (or confused) guest: garbage, then correct-looking ping replies, but no SYNC.
    fake = {"answer_sync": False, "before_sync": b"\x00\x00\x00\x03abc" + struct.pack(">I", 2) + b"[]"}
    session = make_session(connect=False, fake=fake)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="did not answer within"):
        session.connect(timeout=1.0)
    assert time.monotonic() - started < 2.5
    assert not session.connected
    assert any(m["type"] == "ping" for m in session.agents[0].seen)  # it did get (and answer) pings
    assert session.agents[0].syncs >= 1 and not session.agents[0].synced.is_set()
    assert "dropping the connection" not in caplog.text
    fake["answer_sync"] = True  # the same session connects once the guest behaves
    assert session.connect(timeout=3).kernel == "6.1.0-test"
    assert session.connected and session.request("ping", {})["kernel"] == "6.1.0-test"


def test_connect_states_the_version_and_refuses_another(make_session):
    """The first request says the host's protocol version; an agent that answers with another
    one (or none) is refused, and so is the host when the agent refuses it: both named."""
    session = make_session()
    assert session.agents[0].seen[0]["type"] == "ping"
    assert session.agents[0].seen[0]["protocol"] == PROTOCOL_VERSION
    assert session.info.protocol == PROTOCOL_VERSION

    def old_agent(agent, msg):
        agent.reply(msg, {k: v for k, v in PING.items() if k != "protocol"})

    with pytest.raises(Unavailable, match=f"mismatch: the host speaks version {PROTOCOL_VERSION}, "
                                          "the guest agent version 1"):
        make_session(old_agent)

    def newer_agent(agent, msg):
        agent.fail(msg, "FAILED_PRECONDITION", f"protocol version mismatch: the host speaks version "
                                               f"{msg['protocol']}, the guest agent version 3")

    with pytest.raises(FailedPrecondition, match=f"version {PROTOCOL_VERSION}, the guest agent version 3"):
        make_session(newer_agent)


def test_replies_are_matched_by_id_out_of_order(make_session):
    held: list[dict] = []

    def reverse(agent, msg):
        if msg["type"] == "ping":
            agent.reply(msg, PING)
        elif msg["type"] == "start":
            held.append(msg)
            if len(held) == 2:
                for m in reversed(held):
                    agent.reply(m, {"pid": 100 + len(m["container_id"])})

    session = make_session(reverse, request_timeout_s=3)
    results = {}
    threads = [threading.Thread(target=lambda cid=cid: results.__setitem__(
        cid, session.request("start", {"container_id": cid}))) for cid in ("a", "bbb")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert results == {"a": {"pid": 101}, "bbb": {"pid": 103}}
    ids = [m["id"] for m in session.agents[0].seen]
    assert len(ids) == len(set(ids))


def test_request_timeout_then_late_reply_is_ignored(make_session, caplog):
    held: list[dict] = []

    def slow(agent, msg):
        if msg["type"] == "ping":
            agent.reply(msg, PING)
        else:
            held.append(msg)

    session = make_session(slow)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        session.request("ps", {"container_id": "c1"})
    assert 0.4 < time.monotonic() - started < 2
    session.agents[0].reply(held[0], {"processes": []})
    assert session.request("ping", {})["kernel"] == "6.1.0-test"
    assert "unknown request" not in caplog.text
    assert session.connected


@pytest.mark.parametrize("code,exc", [("NOT_FOUND", NotFound), ("ALREADY_EXISTS", AlreadyExists),
                                      ("FAILED_PRECONDITION", FailedPrecondition), ("INTERNAL", Internal)])
def test_error_replies_map_to_typed_errors(make_session, code, exc):
    def failing(agent, msg):
        if msg["type"] == "ping":
            agent.reply(msg, PING)
        else:
            agent.fail(msg, code, "it went wrong")

    session = make_session(failing)
    with pytest.raises(exc, match="guest agent: it went wrong"):
        session.request("start", {"container_id": "c1"})


def test_invalid_reply_fails_its_request_and_keeps_the_connection(make_session):
    def bad(agent, msg):
        if msg["type"] == "ping":
            agent.reply(msg, PING)
        else:
            agent.send({"type": "reply", "id": msg["id"], "ok": "maybe"})

    session = make_session(bad)
    with pytest.raises(Internal, match="invalid reply"):
        session.request("start", {"container_id": "c1"})
    assert session.connected and session.request("ping", {})["agent_version"] == "0.1.0"


def test_invalid_events_are_dropped(make_session, caplog):
    session = make_session()
    record = add_container(session)
    agent = session.agents[0]
    agent.send({"type": "output", "container_id": "c1", "exec_id": "init", "stream": "stdout",
                "data": b"x" * 70000})
    agent.send({"type": "exit", "container_id": "c1", "exec_id": "init", "exit_code": "0"})
    agent.send({"type": "surprise"})
    agent.send({"type": "output", "container_id": "nope", "exec_id": "init", "stream": "stdout", "data": ""})
    agent.send({"type": "reply", "id": 99999, "ok": True})
    assert session.request("ping", {})
    assert record.status == "running" and record.buffered() == 0
    assert "dropped a message from the guest" in caplog.text
    assert session.connected


@pytest.mark.parametrize("garbage", [struct.pack(">I", 0x7FFFFFFE), struct.pack(">I", MAX_FRAME + 1),
                                     b"\x00\x00\x00\x00", struct.pack(">I", 5) + b"{bad}",
                                     struct.pack(">I", 2) + b"[]"],
                         ids=["huge", "max+1", "zero", "json", "array"])
def test_framing_error_drops_the_connection(make_session, garbage, caplog):
    held: list[dict] = []

    def holder(agent, msg):
        if msg["type"] == "ping":
            agent.reply(msg, PING)
        else:
            held.append(msg)

    session = make_session(holder, request_timeout_s=5)
    record = add_container(session)
    errors = []
    waiter = threading.Thread(target=lambda: _capture(errors, session.request, "ps", {"container_id": "c1"}))
    waiter.start()
    assert wait_for(lambda: held)
    session.agents[0].send_raw(garbage)
    waiter.join(3)
    assert errors and isinstance(errors[0], Unavailable)
    assert not session.connected and "protocol error" in session.lost_reason
    assert record.status == "stopped" and record.exit_code is None and record.signal == 9
    assert session.changes
    assert "dropping the connection" in caplog.text
    with pytest.raises(Unavailable):
        session.request("ping", {})


def test_a_run_of_ff_from_the_guest_is_a_resync_not_a_framing_error(make_session, caplog):
    """A length prefix 7F FF FF FF holds a run of 0xFF, i.e. a SYNC marker (docs/agent-protocol.md:
    the agent writes one for each host SYNC it reads, also a stale one). The decoder drops the
    stray 7F and starts over there; the connection stays and the next frames count."""
    held: list[dict] = []

    def holder(agent, msg):
        if msg["type"] == "ping":
            agent.reply(msg, PING)
        else:
            held.append(msg)

    session = make_session(holder, request_timeout_s=5)
    results: list[dict] = []
    waiter = threading.Thread(target=lambda: results.append(session.request("ps", {"container_id": "c1"})))
    waiter.start()
    assert wait_for(lambda: held)
    agent = session.agents[0]
    agent.send_raw(struct.pack(">I", 0x7FFFFFFF))
    time.sleep(0.1)
    agent.send_raw(SYNC)
    agent.reply(held[0], {"processes": []})
    waiter.join(3)
    assert results == [{"processes": []}]
    assert session.connected and "dropping the connection" not in caplog.text


def _capture(errors, fn, *args):
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001
        errors.append(exc)


def test_guest_hangup_marks_processes_stopped_but_close_does_not(make_session):
    session = make_session()
    record = add_container(session)
    session.agents[0].sock.shutdown(socket.SHUT_RDWR)  # QEMU went away
    # connected flips first, then the processes are marked: wait for both
    assert wait_for(lambda: not session.connected and record.status == "stopped")
    assert record.state().exit_status == 137  # killed with its VM, as Docker shows it
    other = make_session()
    kept = add_container(other)
    other.close()
    assert kept.status == "running"


def test_output_is_buffered_then_exit_follows_it(make_session):
    session = make_session()
    record = add_container(session)
    agent = session.agents[0]
    for i in range(3):
        agent.send({"type": "output", "container_id": "c1", "exec_id": "init",
                    "stream": "stdout" if i % 2 == 0 else "stderr",
                    "data": f"chunk{i}".encode()})
    agent.send({"type": "exit", "container_id": "c1", "exec_id": "init", "exit_code": 3, "signal": None})
    assert wait_for(lambda: record.status == "stopped")
    assert session.changes
    client = object()
    assert record.attach(client)
    assert not record.attach(object())
    events = [record.next_event(client, 1) for _ in range(4)]
    assert events[:3] == [OutputEvent("stdout", b"chunk0"), OutputEvent("stderr", b"chunk1"),
                          OutputEvent("stdout", b"chunk2")]
    assert events[3] == ExitEvent(3, None)
    assert record.state().exit_status == 3


def test_output_buffer_keeps_the_newest_bytes(make_session):
    session = make_session(output_buffer_bytes=4096)
    record = add_container(session)
    for i in range(10):
        record.push_output("stdout", bytes([65 + i]) * 1000)
    assert record.buffered() <= 4096 and record.dropped == 6000
    client = object()
    record.attach(client)
    first = record.next_event(client, 1)
    assert first.data[:1] == b"G"


def test_guest_protocol_error_during_connect_makes_a_fresh_connection(make_session):
    def torn_first(agent, msg):
        if len(session_agents) == 1:  # the first connection: the guest saw a torn frame
            agent.send({"type": "protocol_error", "message": "frame length 0"})
        elif msg["type"] == "ping":
            agent.reply(msg, PING)

    session = make_session(torn_first, connect=False)
    session_agents = session.agents
    session.connect(timeout=3)
    assert session.connected and len(session.agents) == 2


def test_stale_replies_for_an_earlier_agentd_match_nothing(make_session):
    def stale_then_real(agent, msg):
        if msg["type"] == "ping":
            agent.reply(msg, PING)
        elif msg["type"] == "start":
            for old_id in range(1, 200):  # what the guest queued for the previous agentd
                agent.send({"type": "reply", "id": old_id, "ok": True, "result": {"pid": 666}})
            agent.reply(msg, {"pid": 7})

    session = make_session(stale_then_real)
    assert session.request("start", {"container_id": "c1"}) == {"pid": 7}
    assert min(m["id"] for m in session.agents[0].seen) > 1 << 20
