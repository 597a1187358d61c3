"""agentd end to end: the real `hanabi-agentd serve` against the real guest agent run on the
host (`python -m hanabi_guest.agent --fd N`, no chroot, no mounts) behind a Unix listening
socket that plays QEMU's virtio-serial chardev (`server=on,wait=off`). No VM is booted, so
these run as any user; hostile peers are in-process fakes.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import zmq

from hanabi_agentd.client import AgentdClient
from hanabi_agentd.iostream import IoError, IoStream, exit_status
from hanabi_common.config import load_config
from hanabi_common.errors import (AlreadyExists, DeadlineExceeded, FailedPrecondition,
                                  InvalidArgument, NotFound, Unavailable)
from hanabi_common.models.agentd import RootfsSpec
from hanabi_common.rpc.client import RpcClient
from hanabi_wire import PROTOCOL_VERSION

from tests.helpers.fake_agent import FakeAgent, ListeningFakeAgent

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
ROOTFS = RootfsSpec(serial="disk0")
ENV = ["PATH=/usr/local/bin:/usr/bin:/bin", "HOME=/"]

# Plays QEMU's chardev socket: one host client at a time, the agent's stream persists across
# host connections; guest->host bytes are forwarded frame by frame, and frames produced while
# no host is connected wait for the next one.
CHARDEV = textwrap.dedent("""
    import os, select, socket, subprocess, sys
    from hanabi_wire import SYNC, T_SYNC_MARKER, FrameDecoder, encode_frame
    path, rootfs = sys.argv[1], sys.argv[2]
    ours, theirs = socket.socketpair()
    agent = subprocess.Popen([sys.executable, "-m", "hanabi_guest.agent", "--fd", str(theirs.fileno()),
                              "--rootfs-dir", rootfs], pass_fds=(theirs.fileno(),))
    theirs.close()
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    decoder, backlog = FrameDecoder(), []

    def from_agent():
        data = ours.recv(65536)
        if not data:
            sys.exit(agent.wait())
        backlog.extend(decoder.feed(data))

    while True:
        ready, _, _ = select.select([srv, ours], [], [])
        if ours in ready:
            from_agent()
        if srv not in ready:
            continue
        conn, _ = srv.accept()
        alive = True
        while alive:
            while backlog:
                try:
                    msg = backlog[0]
                    conn.sendall(SYNC if msg.get("type") == T_SYNC_MARKER else encode_frame(msg))
                except OSError:
                    alive = False
                    break
                backlog.pop(0)
            if not alive:
                break
            ready, _, _ = select.select([conn, ours], [], [])
            if conn in ready:
                data = conn.recv(65536)
                if not data:
                    break
                ours.sendall(data)
            if ours in ready:
                from_agent()
        conn.close()
""")


class Agentd:
    """One `hanabi-agentd serve` subprocess with its own run dir."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config_path = root / "hanabi.toml"
        self.config_path.write_text(textwrap.dedent(f"""
            run_dir = "{root / 'run'}"
            log_level = "debug"
            [agent]
            ready_timeout_s = 10
            request_timeout_s = 5
            output_buffer_bytes = 1048576
        """))
        self.config = load_config(self.config_path)
        self.log_path = root / "agentd.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([str(BIN / "hanabi-agentd"), "serve", "--config", str(self.config_path)],
                                         stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        rpc = RpcClient("agentd", self.config.endpoint("agentd"), timeout=1)
        deadline = time.monotonic() + 20
        while True:
            try:
                rpc.ping(timeout=1)
                return
            except (Unavailable, DeadlineExceeded):
                assert self.proc.poll() is None, self.log()
                assert time.monotonic() < deadline, "agentd did not come up:\n" + self.log()
                time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=15)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def client(self) -> AgentdClient:
        return AgentdClient(self.config)


class Chardev:
    """The real guest agent behind a listening socket, as QEMU would expose it."""

    def __init__(self, root: Path, name: str) -> None:
        self.path = root / f"{name}.sock"
        script = root / "chardev.py"
        script.write_text(CHARDEV)
        self.log = open(root / f"{name}.peer.log", "ab")
        self.proc = subprocess.Popen([sys.executable, str(script), str(self.path), "/"],
                                     stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self.path.exists():
            assert time.monotonic() < deadline and self.proc.poll() is None, "chardev peer did not start"
            time.sleep(0.02)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


PING = {"agent_version": "9.9", "kernel": "hostile", "uptime_s": 1.0, "protocol": PROTOCOL_VERSION}


class HostilePeer(ListeningFakeAgent):
    """A hostile guest behind a listening socket (tests/helpers/fake_agent.py does the SYNC
    handshake like the real agent unless told otherwise). `mode`:
    - "after_sync": answers SYNC and pings like an agent; `send_garbage()` then writes garbage;
    - "at_connect": answers SYNC, then answers every request with garbage;
    - "before_sync": writes garbage at once and answers every ping with a correct reply
      followed by garbage, but never answers SYNC: agentd must hear none of it.
    """

    def __init__(self, path: Path, garbage: bytes, mode: str = "after_sync") -> None:
        assert mode in ("after_sync", "at_connect", "before_sync")
        self.garbage, self.mode = garbage, mode
        before = garbage if mode == "before_sync" else b""
        super().__init__(str(path), lambda conn: FakeAgent(conn, self._talk, before_sync=before,
                                                           answer_sync=mode != "before_sync"))

    def _talk(self, agent: FakeAgent, msg: dict) -> None:
        if self.mode == "at_connect":
            agent.send_raw(self.garbage)
        elif msg.get("type") == "ping":
            agent.reply(msg, PING)
            if self.mode == "before_sync":
                agent.send_raw(self.garbage)

    def send_garbage(self) -> None:
        self.agents[-1].send_raw(self.garbage)


@pytest.fixture(scope="module")
def agentd(tmp_path_factory):
    daemon = Agentd(tmp_path_factory.mktemp("agentd"))
    daemon.start()
    yield daemon
    daemon.stop()


@pytest.fixture
def guest(agentd, request):
    """A sandbox connected to the real agent; yields its id."""
    sid = "sb-" + request.node.name.replace("[", "-").replace("]", "")[:40]
    peer = Chardev(agentd.root, sid)
    try:
        agentd.client.connect(sid, str(peer.path))
        yield sid
        agentd.client.disconnect(sid)
    finally:
        peer.close()


def process(*args: str) -> dict:
    return {"args": list(args), "cwd": "/", "env": ENV, "terminal": False}


def run_to_exit(stream: IoStream, timeout: float = 20) -> tuple[bytes, bytes, dict]:
    out, err = b"", b""
    stream._sock.settimeout(timeout)
    while stream.exited is None:
        for event in stream.read_events():
            if event["type"] == "output":
                if event["stream"] == "stdout":
                    out += event["data"]
                else:
                    err += event["data"]
    return out, err, stream.exited


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_stdout_stderr_and_exit_code(agentd, guest):
    c = agentd.client
    c.create(guest, "c1", ROOTFS, process("sh", "-c", "echo out; echo err >&2; exit 3"))
    assert c.state(guest, "c1").status == "created"
    with IoStream.attach(agentd.config.run_dir, guest, "c1", timeout=5) as stream:
        started = c.start(guest, "c1")
        assert started.pid > 0
        out, err, exited = run_to_exit(stream)
    assert (out, err) == (b"out\n", b"err\n")
    assert exited == {"type": "exit", "exit_code": 3, "signal": None} and exit_status(exited) == 3
    state = c.state(guest, "c1")
    assert state.status == "stopped" and state.processes[0].exit_status == 3
    saved = json.loads((agentd.config.sandboxes_dir / guest / "agent.json").read_text())
    assert saved["containers"]["c1"]["processes"]["init"] == {
        "exec_id": "init", "status": "stopped", "pid": started.pid, "exit_code": 3, "signal": None}
    with pytest.raises(FailedPrecondition):
        c.start(guest, "c1")
    assert c.destroy(guest, "c1").existed
    assert not c.destroy(guest, "c1").existed
    with pytest.raises(NotFound):
        c.state(guest, "c1")


def test_cat_relays_stdin(agentd, guest):
    c = agentd.client
    c.create(guest, "cat", ROOTFS, process("cat"))
    payload = os.urandom(300_000) + b"\nthe end\n"
    with IoStream.attach(agentd.config.run_dir, guest, "cat", timeout=5) as stream:
        stream.send_stdin(payload[:1000])  # before start: held until the process runs
        c.start(guest, "cat")
        sender = threading.Thread(target=lambda: (stream.send_stdin(payload[1000:]), stream.close_stdin()))
        sender.start()
        out, err, exited = run_to_exit(stream)
        sender.join(10)
    assert out == payload and err == b""
    assert exited["exit_code"] == 0
    c.destroy(guest, "cat")


def test_signal_9_gives_status_137(agentd, guest):
    c = agentd.client
    c.create(guest, "sleeper", ROOTFS, process("sleep", "300"))
    with IoStream.attach(agentd.config.run_dir, guest, "sleeper", timeout=5) as stream:
        c.start(guest, "sleeper")
        assert c.state(guest, "sleeper").status == "running"
        c.signal(guest, "sleeper", 9)
        _, _, exited = run_to_exit(stream)
    assert exited == {"type": "exit", "exit_code": None, "signal": 9} and exit_status(exited) == 137
    proc = c.state(guest, "sleeper").processes[0]
    assert proc.status == "stopped" and proc.signal == 9 and proc.exit_status == 137
    with pytest.raises(FailedPrecondition):
        c.signal(guest, "sleeper", 15)
    c.destroy(guest, "sleeper")


def test_exec_ps_and_destroy(agentd, guest):
    c = agentd.client
    c.create(guest, "box", ROOTFS, process("sleep", "300"))
    with pytest.raises(FailedPrecondition):
        c.exec(guest, "box", "e1", process("true"))
    c.start(guest, "box")
    with pytest.raises(AlreadyExists):
        c.create(guest, "box", ROOTFS, process("true"))
    c.exec(guest, "box", "e1", process("sh", "-c", "echo from-exec; exit 4"))
    with IoStream.attach(agentd.config.run_dir, guest, "box", "e1", timeout=5) as stream:
        out, _, exited = run_to_exit(stream)
    assert out == b"from-exec\n" and exited["exit_code"] == 4
    listed = c.ps(guest, "box").processes
    assert [p.exec_id for p in listed] == ["init"] and listed[0].args == ["sleep", "300"]
    states = {p.exec_id: p for p in c.state(guest, "box").processes}
    assert states["init"].status == "running" and states["e1"].exit_code == 4
    stream = IoStream.attach(agentd.config.run_dir, guest, "box", timeout=5)
    assert c.destroy(guest, "box").existed
    _, _, exited = run_to_exit(stream)  # the stand-in hears about the kill
    assert exited["signal"] == 9
    stream.close()
    with pytest.raises(IoError):
        IoStream.attach(agentd.config.run_dir, guest, "box", timeout=2)


def test_connect_errors_and_agent_listing(agentd, guest):
    c = agentd.client
    with pytest.raises(AlreadyExists):
        c.connect(guest, str(agentd.root / "whatever.sock"))
    with pytest.raises(DeadlineExceeded):
        c.connect("nosock", str(agentd.root / "missing.sock"), timeout_s=1)
    with pytest.raises(InvalidArgument):
        c.connect("rel", "relative/agent.sock")
    with pytest.raises(NotFound):
        c.get("nosock")
    info = c.get(guest)
    assert info.connected and info.agent_version and info.kernel == os.uname().release
    assert guest in [a.sandbox_id for a in c.list().agents]
    ctl = subprocess.run([str(BIN / "hanabi-agentd"), "ctl", "--config", str(agentd.config_path), "inspect", guest],
                         capture_output=True, timeout=30)
    assert ctl.returncode == 0, ctl.stderr
    assert json.loads(ctl.stdout)["agent"]["sandbox_id"] == guest
    ctl = subprocess.run([str(BIN / "hanabi-agentd"), "ctl", "--config", str(agentd.config_path), "list"],
                         capture_output=True, timeout=30)
    assert ctl.returncode == 0 and guest.encode() in ctl.stdout


def test_disconnect_shuts_the_guest_down(agentd, tmp_path):
    peer = Chardev(agentd.root, "sb-disc")
    try:
        c = agentd.client
        c.connect("sb-disc", str(peer.path))
        assert (agentd.config.sandboxes_dir / "sb-disc" / "agent.json").exists()
        assert c.disconnect("sb-disc").existed
        assert peer.proc.wait(timeout=10) == 0  # the agent got shutdown and ended
        assert not (agentd.config.sandboxes_dir / "sb-disc").exists()
        assert not c.disconnect("sb-disc").existed
    finally:
        peer.close()


# Garbage after the SYNC answer. (A prefix like 7F FF FF FF is no framing error any more: a
# run of three 0xFF is a SYNC marker, where agentd starts over; see test_agentd_session.py.)
@pytest.mark.parametrize("garbage", [struct.pack(">I", 0x7FFFFFFE), struct.pack(">I", 9) + b"not json!",
                                     struct.pack(">I", 4) + b"\xff\xfe\xfd\xfc", b"\x00\x00\x00\x00"],
                         ids=["oversized", "json", "utf8", "zero"])
def test_hostile_peer_is_dropped_and_agentd_keeps_serving(agentd, garbage, request):
    sid = "hostile-" + request.node.callspec.id
    path = agentd.root / f"{sid}.sock"
    peer = HostilePeer(path, garbage)
    try:
        c = agentd.client
        dropped_before = agentd.log().count("guest broke the framing, dropping the connection")
        assert c.connect(sid, str(path)).kernel == "hostile"
        assert peer.agents[0].synced.is_set()
        peer.send_garbage()
        wait_until(lambda: not c.get(sid).connected)
        wait_until(lambda: agentd.log().count("guest broke the framing, dropping the connection")
                   > dropped_before)
        assert RpcClient("agentd", agentd.config.endpoint("agentd")).ping()["daemon"] == "agentd"
        with pytest.raises(Unavailable):
            c.create(sid, "c1", ROOTFS, process("true"))
        assert c.disconnect(sid).existed
    finally:
        peer.close()


def test_hostile_peer_at_connect_fails_fast(agentd):
    """Garbage where the ping reply should be, after the SYNC answer: a framing error."""
    path = agentd.root / "evil.sock"
    peer = HostilePeer(path, b"\x00\x00\x00\x03abc", mode="at_connect")
    started = time.monotonic()
    with pytest.raises(Unavailable, match="protocol"):
        agentd.client.connect("evil", str(path), timeout_s=8)
    assert time.monotonic() - started < 5
    with pytest.raises(NotFound):
        agentd.client.get("evil")
    peer.close()


@pytest.mark.parametrize("garbage", [b"\x00\x00\x00\x03abc", struct.pack(">I", 0x7FFFFFFE) + b"x" * 100],
                         ids=["json", "oversized"])
def test_hostile_peer_before_sync_is_ignored_and_connect_times_out(agentd, garbage, request):
    """Garbage and even correct ping replies count for nothing before the agent's SYNC: no
    framing error, no connection; connect ends with a clear DeadlineExceeded."""
    sid = "presync-" + request.node.callspec.id
    path = agentd.root / f"{sid}.sock"
    peer = HostilePeer(path, garbage, mode="before_sync")
    try:
        dropped_before = agentd.log().count("guest broke the framing")
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match=f"guest agent of sandbox {sid} did not answer within"):
            agentd.client.connect(sid, str(path), timeout_s=2)
        assert time.monotonic() - started < 6
        assert peer.connections >= 1 and peer.agents[0].syncs >= 1  # agentd did send SYNC
        assert any(m.get("type") == "ping" for m in peer.agents[0].seen)  # ...and pings, answered
        assert agentd.log().count("guest broke the framing") == dropped_before
        with pytest.raises(NotFound):
            agentd.client.get(sid)
        assert RpcClient("agentd", agentd.config.endpoint("agentd")).ping()["daemon"] == "agentd"
    finally:
        peer.close()


def test_unknown_method_and_garbage_zmq_frames(agentd):
    endpoint = agentd.config.endpoint("agentd")
    rpc = RpcClient("agentd", endpoint, timeout=5)
    with pytest.raises(NotFound, match="no method"):
        rpc.call("container.teleport", {})
    with pytest.raises(InvalidArgument):
        rpc.call("container.state", {"sandbox_id": "../etc", "container_id": "c"})
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        for frames in ([b"\xff\x00garbage"], [b"HANABI-RPC", b"[1,2]", b"{}"], [b"", b"", b"", b""]):
            sock.send_multipart([b""] + frames)
            assert sock.poll(5000)
            assert b"INVALID_ARGUMENT" in sock.recv_multipart()[-1]
    finally:
        sock.close(0)
    assert rpc.ping()["daemon"] == "agentd"


def test_restarted_agentd_reconnects_and_keeps_serving(tmp_path_factory):
    daemon = Agentd(tmp_path_factory.mktemp("agentd-restart"))
    daemon.start()
    peer = Chardev(daemon.root, "sb-r")
    try:
        c = daemon.client
        c.connect("sb-r", str(peer.path))
        c.create("sb-r", "done", ROOTFS, process("sh", "-c", "exit 6"))
        c.start("sb-r", "done")
        wait_until(lambda: c.state("sb-r", "done").status == "stopped")
        c.create("sb-r", "reader", ROOTFS, process("sh", "-c", "read x; echo got $x; exit 7"))
        stream = IoStream.attach(daemon.config.run_dir, "sb-r", "reader", timeout=5)
        c.start("sb-r", "reader")
        daemon.stop(signal.SIGKILL)
        daemon.start()
        info = c.get("sb-r")
        wait_until(lambda: c.get("sb-r").connected)
        assert info.sandbox_id == "sb-r"
        assert c.state("sb-r", "done").processes[0].exit_code == 6  # known from agent.json
        assert c.state("sb-r", "reader").status == "running"
        stream.reattach(timeout=10)  # what the stand-in does when its io stream breaks
        stream.send_stdin(b"hello\n")
        out, _, exited = run_to_exit(stream)
        stream.close()
        assert out == b"got hello\n" and exited["exit_code"] == 7
        assert c.state("sb-r", "reader").processes[0].exit_code == 7
        c.disconnect("sb-r")
    finally:
        daemon.stop()
        peer.close()
