"""Window resizes through agentd: the io socket's `resize` message, `IoStream.resize`, and
the `container.resize` RPC, all passed on to the guest as `resize` requests."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time

import pytest
from pydantic import ValidationError

from hanabi_agentd.io_server import IoServer, io_socket_path
from hanabi_agentd.iostream import IoStream
from hanabi_agentd.models import ResizeProcess
from hanabi_agentd.process import ContainerRecord
from hanabi_agentd.service import AgentService
from hanabi_agentd.session import AgentSession
from hanabi_common.config import AgentConfig, Config
from hanabi_common.errors import FailedPrecondition, NotFound
from hanabi_common.models.agentd import ConnectAgent, ContainerRef, CreateContainer, RootfsSpec
from hanabi_wire import FrameDecoder, encode_frame

from tests.helpers.fake_agent import FakeAgent
from tests.unit.test_agentd_service import ListeningAgent
from tests.unit.test_agentd_session import PING, PairChannel


def tty_agent(agent: FakeAgent, msg: dict) -> None:
    """ping, start (pid 42), resize (ok)."""
    kind = msg["type"]
    if kind == "ping":
        agent.reply(msg, PING)
    elif kind == "start":
        agent.reply(msg, {"pid": 42})
    elif kind == "resize":
        agent.reply(msg)


@pytest.fixture
def rig():
    run_dir = tempfile.mkdtemp(prefix="hrs", dir="/tmp")
    config = Config(run_dir=run_dir, agent=AgentConfig(ready_timeout_s=3, request_timeout_s=2))
    agents: list[FakeAgent] = []
    session = AgentSession("sb1", lambda: PairChannel(tty_agent, agents), config)
    session.connect()
    session.containers["c1"] = ContainerRecord("c1", session.new_process("c1", "init"))
    server = IoServer(io_socket_path(config.run_dir), lambda s, c, e: (session, session.process(c, e)))
    server.start()
    yield run_dir, session, agents
    server.stop()
    session.close()
    shutil.rmtree(run_dir, ignore_errors=True)


def resizes(agent: FakeAgent) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "id"} for m in agent.seen if m["type"] == "resize"]


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_iostream_resize_reaches_the_guest_once_the_process_runs(rig):
    run_dir, session, agents = rig
    stream = IoStream.attach(run_dir, "sb1", "c1", "init", timeout=2)
    stream.resize(24, 80)  # before start: held back like stdin (the guest has no pty yet)
    time.sleep(0.2)
    assert resizes(agents[0]) == []
    session.process("c1", "init").mark_running(session.request("start", {"container_id": "c1"})["pid"])
    stream.resize(65535, 1)
    wait_for(lambda: len(resizes(agents[0])) == 2)
    assert resizes(agents[0]) == [
        {"type": "resize", "container_id": "c1", "exec_id": "init", "height": 24, "width": 80},
        {"type": "resize", "container_id": "c1", "exec_id": "init", "height": 65535, "width": 1}]
    stream.close()


@pytest.mark.parametrize("height,width", [(0, 80), (24, 65536), (-1, 80), ("24", 80), (24.0, 80),
                                          (True, 80), (None, 80)])
def test_iostream_resize_validates(rig, height, width):
    run_dir, _, _ = rig
    with IoStream.attach(run_dir, "sb1", "c1", timeout=2) as stream:
        with pytest.raises(ValueError, match="1..65535"):
            stream.resize(height, width)


@pytest.mark.parametrize("message", [
    {"type": "resize", "height": 0, "width": 80},
    {"type": "resize", "height": 24, "width": 65536},
    {"type": "resize", "height": "24", "width": 80},
    {"type": "resize", "height": True, "width": 80},
    {"type": "resize", "height": 24.5, "width": 80},
    {"type": "resize", "height": 24},
    {"type": "resize", "height": 24, "width": 80, "extra": 1},
])
def test_bad_resize_messages_drop_the_client(rig, message):
    run_dir, session, agents = rig
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(3)
    sock.connect(str(io_socket_path(run_dir)))
    sock.sendall(encode_frame({"type": "attach", "sandbox_id": "sb1", "container_id": "c1", "exec_id": "init"})
                 + encode_frame(message))
    decoder, got = FrameDecoder(sync=False), []
    while data := sock.recv(65536):
        got += decoder.feed(data)
    sock.close()
    assert [m["type"] for m in got] == ["attached", "error"]
    assert got[-1]["code"] == "INVALID_ARGUMENT"
    assert resizes(agents[0]) == []


def test_resize_model_bounds():
    ok = ResizeProcess(sandbox_id="s", container_id="c", height=1, width=65535)
    assert ok.exec_id == "init"
    for bad in ({"height": 0, "width": 1}, {"height": 1, "width": 65536}, {"height": "5", "width": 5},
                {"height": 5}):
        with pytest.raises(ValidationError):
            ResizeProcess(sandbox_id="s", container_id="c", **bad)


@pytest.fixture
def svc_rig():
    root = tempfile.mkdtemp(prefix="hrsv", dir="/tmp")
    config = Config(run_dir=root, agent=AgentConfig(ready_timeout_s=3, request_timeout_s=2))
    agent = ListeningAgent(os.path.join(root, "agent.sock"))
    svc = AgentService(config)
    yield svc, agent
    svc.close()
    agent.close()
    shutil.rmtree(root, ignore_errors=True)


def test_container_resize_rpc(svc_rig):
    svc, agent = svc_rig
    svc.connect(ConnectAgent(sandbox_id="sb1", socket_path=agent.path))
    svc.create(CreateContainer(sandbox_id="sb1", container_id="c1", rootfs=RootfsSpec(serial="d0"),
                               process={"args": ["sh"], "terminal": True}))
    request = ResizeProcess(sandbox_id="sb1", container_id="c1", height=30, width=90)
    with pytest.raises(FailedPrecondition, match="created"):
        svc.resize(request)
    svc.start(ContainerRef(sandbox_id="sb1", container_id="c1"))
    assert svc.resize(request) == {}
    assert "resize" in agent.received
    with pytest.raises(NotFound):
        svc.resize(ResizeProcess(sandbox_id="sb1", container_id="c1", exec_id="e9", height=1, width=1))
    with pytest.raises(NotFound):
        svc.resize(ResizeProcess(sandbox_id="sb1", container_id="nope", height=1, width=1))
