"""AgentService without ZeroMQ: containers, agent.json, and what a restarted agentd knows."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time

import pytest

from hanabi_agentd.service import AgentService
from hanabi_agentd.state import AgentState
from hanabi_common.config import AgentConfig, Config
from hanabi_common.errors import (AlreadyExists, FailedPrecondition, InvalidArgument, NotFound,
                                  Unavailable)
from hanabi_common.models.agentd import (ConnectAgent, ContainerRef, CreateContainer, ExecProcess,
                                         RootfsSpec, SignalProcess)
from hanabi_common.models.base import NoArgs, SandboxRef
from hanabi_wire import PROTOCOL_VERSION

from tests.helpers.fake_agent import FakeAgent, ListeningFakeAgent

PING = {"agent_version": "0.1.0", "kernel": "6.1.0-fake", "uptime_s": 1.0, "protocol": PROTOCOL_VERSION}


class ListeningAgent(ListeningFakeAgent):
    """A fake guest agent behind a Unix listening socket (like QEMU's chardev); each
    connection answers the host's SYNC like the real agent (tests/helpers/fake_agent.py)."""

    def __init__(self, path: str) -> None:
        self.alive: set[tuple[str, str]] = set()
        self.received: list[str] = []
        super().__init__(path, lambda conn: FakeAgent(conn, self._serve))

    def _serve(self, agent: FakeAgent, msg: dict) -> None:
        self.received.append(msg["type"])
        for answer in self.answer(msg):
            agent.send(answer)

    def answer(self, msg: dict) -> list[dict]:
        kind, rid = msg["type"], msg.get("id")
        cid, eid = msg.get("container_id"), msg.get("exec_id", "init")

        def ok(result=None):
            return {"type": "reply", "id": rid, "ok": True, "result": result or {}}

        if kind == "ping":
            return [ok(PING)]
        if kind == "start":
            self.alive.add((cid, "init"))
            return [ok({"pid": 100})]
        if kind == "exec":
            if msg["process"].get("args") == ["fail"]:
                return [{"type": "reply", "id": rid, "ok": False,
                         "error": {"code": "INVALID_ARGUMENT", "message": "no such binary"}}]
            self.alive.add((cid, eid))
            return [ok({"pid": 101})]
        if kind == "ps":
            return [ok({"processes": [{"pid": 100, "exec_id": e, "args": []}
                                      for c, e in sorted(self.alive) if c == cid]})]
        if kind == "destroy_container":
            if not any(c == cid for c, _ in self.alive) and cid != "created-only":
                return [{"type": "reply", "id": rid, "ok": False,
                         "error": {"code": "NOT_FOUND", "message": f"container {cid} not found"}}]
            self.alive = {(c, e) for c, e in self.alive if c != cid}
            return [ok()]
        if kind == "signal":
            self.alive.discard((cid, eid))
            return [ok(), {"type": "exit", "container_id": cid, "exec_id": eid,
                           "exit_code": None, "signal": msg["signal"]}]
        if rid is not None:
            return [ok()]
        return []

    def exit(self, cid: str, eid: str, code: int) -> None:
        self.alive.discard((cid, eid))
        self.agents[-1].send({"type": "exit", "container_id": cid, "exec_id": eid,
                              "exit_code": code, "signal": None})

    def close(self) -> None:
        super().close()
        os.unlink(self.path)


@pytest.fixture
def rig():
    root = tempfile.mkdtemp(prefix="hsvc", dir="/tmp")
    config = Config(run_dir=root, agent=AgentConfig(ready_timeout_s=3, request_timeout_s=2))
    agent = ListeningAgent(os.path.join(root, "agent.sock"))
    services: list[AgentService] = []

    def service() -> AgentService:
        svc = AgentService(config)
        services.append(svc)
        return svc

    yield config, agent, service
    for svc in services:
        svc.close()
    try:
        agent.close()
    except OSError:
        pass
    shutil.rmtree(root, ignore_errors=True)


def wait_until(predicate, timeout=30.0):  # a bound, not a wait: a loaded CI host is slow
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def create(svc, cid, sid="sb1"):
    svc.create(CreateContainer(sandbox_id=sid, container_id=cid, rootfs=RootfsSpec(serial="d0"),
                               process={"args": ["sleep", "1"]}))


def ref(cid, sid="sb1"):
    return ContainerRef(sandbox_id=sid, container_id=cid)


def test_lifecycle_and_agent_json(rig):
    config, agent, service = rig
    svc = service()
    info = svc.connect(ConnectAgent(sandbox_id="sb1", socket_path=agent.path))
    assert info.connected and info.kernel == "6.1.0-fake"
    with pytest.raises(AlreadyExists):
        svc.connect(ConnectAgent(sandbox_id="sb1", socket_path=agent.path))
    create(svc, "c1")
    with pytest.raises(AlreadyExists):
        create(svc, "c1")
    with pytest.raises(FailedPrecondition):
        svc.exec(ExecProcess(sandbox_id="sb1", container_id="c1", exec_id="e1", process={"args": ["x"]}))
    assert svc.start(ref("c1")).pid == 100
    with pytest.raises(InvalidArgument):
        svc.exec(ExecProcess(sandbox_id="sb1", container_id="c1", exec_id="init", process={"args": ["x"]}))
    with pytest.raises(InvalidArgument, match="no such binary"):
        svc.exec(ExecProcess(sandbox_id="sb1", container_id="c1", exec_id="bad", process={"args": ["fail"]}))
    assert [p.exec_id for p in svc.state(ref("c1")).processes] == ["init"]  # the failed exec is gone
    svc.exec(ExecProcess(sandbox_id="sb1", container_id="c1", exec_id="e1", process={"args": ["x"]}))
    agent.exit("c1", "e1", 2)
    wait_until(lambda: svc.state(ref("c1")).processes[1].exit_code == 2)
    wait_until(lambda: svc.registry.store.read("sb1", "agent", AgentState)
               .containers["c1"].processes["e1"].exit_code == 2)
    state = svc.registry.store.read("sb1", "agent", AgentState)
    assert state.containers["c1"].processes["init"].status == "running"
    svc.signal(SignalProcess(sandbox_id="sb1", container_id="c1", signal=15))
    wait_until(lambda: svc.state(ref("c1")).status == "stopped")
    assert svc.state(ref("c1")).processes[0].exit_status == 128 + 15
    assert svc.destroy(ref("c1")).existed
    assert not svc.destroy(ref("c1")).existed
    assert not svc.destroy(ref("c1", sid="other")).existed
    assert svc.disconnect(SandboxRef(sandbox_id="sb1")).existed
    assert "shutdown" in agent.received
    assert not (config.sandboxes_dir / "sb1").exists()
    assert not svc.disconnect(SandboxRef(sandbox_id="sb1")).existed


def test_restarted_service_reconnects_and_reconciles(rig):
    config, agent, service = rig
    first = service()
    first.connect(ConnectAgent(sandbox_id="sb1", socket_path=agent.path))
    for cid in ("keeps", "dies"):
        create(first, cid)
        first.start(ref(cid))
    first.close()  # agentd goes away; the guest keeps running
    assert first.registry.store.read("sb1", "agent", AgentState).containers["dies"]
    agent.alive.discard(("dies", "init"))  # ...and one process ends meanwhile, unheard
    second = service()
    wait_until(lambda: second.get(SandboxRef(sandbox_id="sb1")).connected)
    assert second.state(ref("keeps")).status == "running"
    wait_until(lambda: second.state(ref("dies")).status == "stopped")
    assert second.state(ref("dies")).processes[0].exit_status is None  # unknown, not invented
    assert [a.sandbox_id for a in second.list(NoArgs()).agents] == ["sb1"]
    # Each connection, the restarted agentd's too, started with the SYNC handshake.
    assert len(agent.agents) >= 2 and all(a.syncs == 1 and a.synced.is_set() for a in agent.agents)


def test_restart_with_the_agent_socket_gone(rig):
    config, agent, service = rig
    first = service()
    first.connect(ConnectAgent(sandbox_id="sb1", socket_path=agent.path))
    create(first, "c1")
    first.close()
    agent.close()  # the VM is gone with its chardev socket
    second = service()
    info = second.get(SandboxRef(sandbox_id="sb1"))
    assert not info.connected
    assert second.state(ref("c1")).status == "stopped"  # known from agent.json, gone with its VM
    assert second.state(ref("c1")).processes[0].exit_status == 137
    with pytest.raises(Unavailable):
        second.start(ref("c1"))
    details = second.inspect(SandboxRef(sandbox_id="sb1"))
    assert "gone" in details.lost_reason and "c1" in details.containers
    assert second.disconnect(SandboxRef(sandbox_id="sb1")).existed
    with pytest.raises(NotFound):
        second.get(SandboxRef(sandbox_id="sb1"))


def test_reconnect_after_the_connection_was_lost(rig):
    config, agent, service = rig
    svc = service()
    svc.connect(ConnectAgent(sandbox_id="sb1", socket_path=agent.path))
    create(svc, "c1")
    svc.start(ref("c1"))
    agent.agents[-1].sock.shutdown(socket.SHUT_RDWR)
    # the session flips `connected` first, then marks its processes: wait for both
    wait_until(lambda: not svc.get(SandboxRef(sandbox_id="sb1")).connected
               and svc.state(ref("c1")).status == "stopped")
    again = svc.connect(ConnectAgent(sandbox_id="sb1", socket_path=agent.path))
    assert again.connected
    assert svc.state(ref("c1")).status == "stopped"


def test_a_stand_in_relay_rides_out_an_agentd_restart(rig):
    """The io client of a running process (what a stand-in does) attaches again to the
    restarted agentd: output before and after reaches it, stdin written while agentd was
    away is delivered, and the exit ends the relay with the process's status."""
    import threading

    from hanabi_agentd.iostream import IoStream

    config, agent, service = rig
    first = service()
    first.connect(ConnectAgent(sandbox_id="sb1", socket_path=agent.path))
    create(first, "c1")
    first.start(ref("c1"))
    stream = IoStream.attach(config.run_dir, "sb1", "c1", timeout=5)
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    status: list[int] = []
    relay = threading.Thread(target=lambda: status.append(stream.relay(in_r, out_w, out_w, reattach_timeout=20)))
    relay.start()

    def output(text: bytes, seq: int) -> None:
        agent.agents[-1].send({"type": "output", "container_id": "c1", "exec_id": "init",
                               "stream": "stdout", "data": text, "seq": seq})  # a data frame

    got = bytearray()

    def read_until(wanted: bytes) -> None:
        while wanted not in got:
            got.extend(os.read(out_r, 4096))

    output(b"one\n", 1)
    read_until(b"one\n")
    first.close()  # as if SIGKILLed: the io connection drops, the guest keeps running
    os.write(in_w, b"typed while away\n")
    second = service()
    wait_until(lambda: second.get(SandboxRef(sandbox_id="sb1")).connected)
    output(b"one\n", 1)  # the guest replays what the dead agentd may have lost...
    output(b"two\n", 2)
    read_until(b"two\n")
    assert bytes(got) == b"one\ntwo\n"  # ...and the stand-in keeps it once
    wait_until(lambda: any(m["data"] == b"typed while away\n"
                           for a in agent.agents for m in a.seen if m["type"] == "stdin"))
    agent.exit("c1", "init", 7)
    relay.join(10)
    assert status == [7]
    for fd in (in_r, in_w, out_r, out_w):
        os.close(fd)


def test_restart_forgets_a_sandbox_deleted_while_agentd_was_down(rig):
    from hanabi_common import disowned

    config, agent, service = rig
    first = service()
    first.connect(ConnectAgent(sandbox_id="sb1", socket_path=agent.path))
    create(first, "c1")
    first.close()
    disowned.mark(first.registry.store, "sb1", ["agentd"])  # what `delete` leaves
    second = service()
    with pytest.raises(NotFound):
        second.get(SandboxRef(sandbox_id="sb1"))
    assert not (config.sandboxes_dir / "sb1").exists()
