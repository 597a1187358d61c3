"""The in-guest agent's request handling, run on the host over a socketpair.

The agent runs as a subprocess (``python -m hanabi_guest.agent --fd N --rootfs-dir D``):
DirSandbox, so no mounts, no chroot, no root needed; processes run on the host.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterator

import pytest

import hanabi_wire as P

Msg = dict[str, Any]


class AgentProc:
    """A test client driving one agent subprocess over a socketpair."""

    def __init__(self, rootfs: Path, script: str | None = None, extra: tuple[str, ...] = (),
                 sndbuf: int | None = None) -> None:
        self.sock, theirs = socket.socketpair()
        if sndbuf is not None:  # bound what the channel holds from the agent to us
            theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        self.channel_bytes = theirs.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        fd = theirs.fileno()
        if script is None:
            cmd = [sys.executable, "-m", "hanabi_guest.agent", "--fd", str(fd), "--rootfs-dir", str(rootfs), *extra]
        else:
            cmd = [sys.executable, "-c", script, str(fd)]
        self.proc = subprocess.Popen(cmd, pass_fds=[fd], stderr=subprocess.PIPE)
        theirs.close()
        self.dec = P.FrameDecoder()
        self.inbox: list[Msg] = []
        self.seen: list[Msg] = []  # every message received, in order (the inbox loses what was waited for)
        self.next_id = 0

    def send(self, msg: Msg) -> None:
        self.sock.sendall(P.encode_frame(msg))

    def _pump(self, timeout: float) -> bool:
        r, _, _ = select.select([self.sock], [], [], timeout)
        if not r:
            return False
        data = self.sock.recv(1 << 20)
        if not data:
            raise EOFError("agent closed the channel")
        msgs = self.dec.feed(data)
        self.inbox += msgs
        self.seen += msgs
        return True

    def wait_for(self, pred: Callable[[Msg], bool], timeout: float = 10.0) -> Msg:
        deadline = time.monotonic() + timeout
        while True:
            for i, m in enumerate(self.inbox):
                if pred(m):
                    return self.inbox.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no matching message; inbox={self.inbox}")
            self._pump(left)

    def request(self, mtype: str, timeout: float = 10.0, **fields: Any) -> Msg:
        self.next_id += 1
        rid = self.next_id
        if mtype == P.T_PING:  # a host states its protocol version in every ping
            fields = {**P.ping_fields(), **fields}
        self.send({"type": mtype, "id": rid, **fields})
        return self.wait_for(lambda m: m.get("type") == "reply" and m.get("id") == rid, timeout)

    def ok(self, mtype: str, **fields: Any) -> Msg:
        rep = self.request(mtype, **fields)
        assert rep["ok"] is True, rep
        return rep["result"]

    def err(self, mtype: str, **fields: Any) -> Msg:
        rep = self.request(mtype, **fields)
        assert rep["ok"] is False, rep
        return rep["error"]

    def exit_of(self, exec_id: str, cid: str = "c1", timeout: float = 10.0) -> Msg:
        return self.wait_for(lambda m: m.get("type") == "exit" and m["exec_id"] == exec_id
                             and m["container_id"] == cid, timeout)

    def output_of(self, exec_id: str, stream: str, cid: str = "c1") -> bytes:
        """Pop (in order) every output event of one stream received so far."""
        keep, data = [], b""
        for m in self.inbox:
            if m.get("type") == "output" and m["exec_id"] == exec_id and m["stream"] == stream \
                    and m["container_id"] == cid:
                data += m["data"]
            else:
                keep.append(m)
        self.inbox = keep
        return data

    def close(self) -> int:
        self.sock.close()
        try:
            return self.proc.wait(10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode(errors="replace")


def proc_spec(*args: str, **extra: Any) -> Msg:
    return {"args": list(args), "env": ["PATH=/usr/bin:/bin", "FOO=bar"], "cwd": "/",
            "user": {"uid": os.getuid(), "gid": os.getgid()}, **extra}


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProc]:
    a = AgentProc(tmp_path)
    yield a
    a.close()


@pytest.fixture
def c1(agent: AgentProc) -> AgentProc:
    agent.ok("create_container", container_id="c1", rootfs={"serial": "hanabi-rootfs", "fstype": "ext4",
             "readonly": False}, process=proc_spec("sh", "-c", "read x; echo init got $x"),
             hostname="box")
    return agent


def test_ready_then_ping(agent: AgentProc) -> None:
    ready = agent.wait_for(lambda m: m["type"] == "ready")
    assert ready["kernel"] == os.uname().release and ready["agent_version"]
    res = agent.ok("ping")
    assert res["kernel"] == os.uname().release
    assert isinstance(res["uptime_s"], float) and res["uptime_s"] > 0


def test_ping_negotiates_the_protocol_version(agent: AgentProc) -> None:
    """The agent answers a ping with its protocol version, and refuses a host that states
    another one (or none: version 1), naming both."""
    assert agent.ok("ping")["protocol"] == P.PROTOCOL_VERSION
    newer = agent.err("ping", protocol=P.PROTOCOL_VERSION + 1)
    assert newer["code"] == "FAILED_PRECONDITION" and "protocol version mismatch" in newer["message"]
    assert f"version {P.PROTOCOL_VERSION + 1}" in newer["message"] and f"version {P.PROTOCOL_VERSION}" in newer["message"]
    agent.send({"type": "ping", "id": 77})  # an unversioned host
    old = agent.wait_for(lambda m: m.get("type") == "reply" and m.get("id") == 77)
    assert old["ok"] is False and f"host speaks version {P.UNVERSIONED}," in old["error"]["message"]
    assert agent.err("ping", protocol="2")["code"] == "INVALID_ARGUMENT"  # strict types


def test_exec_separates_stdout_stderr_and_reports_exit_code(c1: AgentProc) -> None:
    res = c1.ok("exec", container_id="c1", exec_id="e1",
                process=proc_spec("sh", "-c", "echo out; echo err >&2; echo $FOO $HOME; exit 3"))
    assert isinstance(res["pid"], int)
    ex = c1.exit_of("e1")
    assert (ex["exit_code"], ex["signal"]) == (3, None)
    assert c1.output_of("e1", "stdout") == b"out\nbar /\n"  # HOME defaulted from rootfs passwd
    assert c1.output_of("e1", "stderr") == b"err\n"


def test_start_init_with_stdin(c1: AgentProc) -> None:
    assert c1.ok("start", container_id="c1")["pid"] > 0
    assert c1.err("start", container_id="c1")["code"] == "FAILED_PRECONDITION"
    c1.send({"type": "stdin", "container_id": "c1", "exec_id": "init", "data": b"hello\n"})
    ex = c1.exit_of("init")
    assert ex["exit_code"] == 0
    assert c1.output_of("init", "stdout") == b"init got hello\n"


def test_stdin_piped_to_cat_in_chunks_then_closed(c1: AgentProc) -> None:
    c1.ok("exec", container_id="c1", exec_id="cat", process=proc_spec("cat"))
    payload = os.urandom(300_000)
    for i in range(0, len(payload), 50_000):
        c1.send({"type": "stdin", "container_id": "c1", "exec_id": "cat", "data": payload[i:i + 50_000]})
    c1.ok("close_stdin", container_id="c1", exec_id="cat")
    assert c1.exit_of("cat")["exit_code"] == 0
    assert c1.output_of("cat", "stdout") == payload


def test_stdin_sent_again_after_a_reconnect_is_taken_once(c1: AgentProc) -> None:
    """A stand-in that attached to a restarted agentd sends its last stdin chunks again,
    with their offsets: what the process had is dropped, the rest taken, in order."""
    c1.ok("exec", container_id="c1", exec_id="cat", process=proc_spec("cat"))

    def stdin(offset: int, data: bytes) -> None:
        c1.send({"type": "stdin", "container_id": "c1", "exec_id": "cat", "data": data, "offset": offset})
    stdin(0, b"abc")
    stdin(3, b"def")
    stdin(0, b"abc")  # the resend: all of it had
    stdin(3, b"defgh")  # overlapping: "gh" is new
    stdin(8, b"ij")
    c1.ok("close_stdin", container_id="c1", exec_id="cat")
    assert c1.exit_of("cat")["exit_code"] == 0
    assert c1.output_of("cat", "stdout") == b"abcdefghij"


def test_large_output_arrives_whole_before_exit(c1: AgentProc) -> None:
    c1.ok("exec", container_id="c1", exec_id="big", process=proc_spec("head", "-c", "3000000", "/dev/zero"))
    c1.exit_of("big")
    outs = [m for m in c1.inbox if m.get("type") == "output"]
    assert all(len(m["data"]) <= P.MAX_DATA_CHUNK for m in outs)
    assert c1.output_of("big", "stdout") == b"\0" * 3_000_000


def test_signal_reports_signal_and_ps(c1: AgentProc) -> None:
    pid = c1.ok("exec", container_id="c1", exec_id="sl", process=proc_spec("sleep", "30"))["pid"]
    procs = c1.ok("ps", container_id="c1")["processes"]
    assert {"pid": pid, "exec_id": "sl", "args": ["sleep", "30"]} in procs
    c1.ok("signal", container_id="c1", exec_id="sl", signal=9)
    ex = c1.exit_of("sl")
    assert (ex["exit_code"], ex["signal"]) == (None, 9)
    assert c1.err("signal", container_id="c1", exec_id="sl", signal=9)["code"] == "NOT_FOUND"


def test_signal_all_and_init_exit_kills_the_rest(c1: AgentProc) -> None:
    c1.ok("exec", container_id="c1", exec_id="a", process=proc_spec("sleep", "30"))
    c1.ok("exec", container_id="c1", exec_id="b", process=proc_spec("sleep", "30"))
    c1.ok("signal", container_id="c1", signal=15, all=True)
    assert {c1.exit_of("a")["signal"], c1.exit_of("b")["signal"]} == {15}
    c1.ok("start", container_id="c1")
    c1.ok("exec", container_id="c1", exec_id="d", process=proc_spec("sleep", "30"))
    c1.ok("close_stdin", container_id="c1", exec_id="init")  # `read x` gets EOF: init exits
    assert c1.exit_of("init")["exit_code"] == 0
    assert c1.exit_of("d")["signal"] == 9


def test_destroy_kills_and_forgets(c1: AgentProc) -> None:
    c1.ok("exec", container_id="c1", exec_id="sl", process=proc_spec("sleep", "30"))
    c1.ok("destroy_container", container_id="c1")
    assert c1.exit_of("sl", timeout=0.1)["signal"] == 9  # exit event came before the reply
    assert c1.err("ps", container_id="c1")["code"] == "NOT_FOUND"


def test_errors_are_replies(c1: AgentProc) -> None:
    assert c1.err("no_such_request")["code"] == "INVALID_ARGUMENT"
    assert c1.err("start", container_id="nope")["code"] == "NOT_FOUND"
    assert c1.err("start", container_id="../etc")["code"] == "INVALID_ARGUMENT"
    assert c1.err("create_container", container_id="c1", rootfs={"serial": "x"},
                  process=proc_spec("true"))["code"] == "ALREADY_EXISTS"
    assert c1.err("create_container", container_id="c2", rootfs={"serial": "x"},
                  process={"args": []})["code"] == "INVALID_ARGUMENT"
    assert c1.err("create_container", container_id="c2", rootfs={"serial": "x"},
                  process=proc_spec("sh", terminal="yes"))["code"] == "INVALID_ARGUMENT"
    assert c1.err("create_container", container_id="c2", rootfs={"serial": "x"},
                  process=proc_spec("sh", terminal=True, consoleSize={"height": 70000, "width": 80})
                  )["code"] == "INVALID_ARGUMENT"
    missing = c1.err("exec", container_id="c1", exec_id="m", process=proc_spec("no-such-binary-xyz"))
    assert missing["code"] == "FAILED_PRECONDITION"
    assert "executable file not found in $PATH" in missing["message"]
    assert c1.err("exec", container_id="c1", exec_id="init", process=proc_spec("true"))["code"] == "ALREADY_EXISTS"
    assert c1.err("signal", container_id="c1", signal=999)["code"] == "INVALID_ARGUMENT"
    c1.send({"type": "ping"})  # request without an id
    assert "no integer id" in c1.wait_for(lambda m: m["type"] == "protocol_error")["message"]
    c1.send({"type": "stdin", "container_id": "c1", "exec_id": "x", "data": "!!"})  # dropped
    assert c1.ok("ping")["kernel"]


def test_rlimits_and_cwd(c1: AgentProc, tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    c1.ok("exec", container_id="c1", exec_id="rl", process=proc_spec(
        "sh", "-c", "ulimit -n; pwd", cwd="/work", rlimits=[{"type": "RLIMIT_NOFILE", "soft": 77, "hard": 77}]))
    assert c1.exit_of("rl")["exit_code"] == 0
    assert c1.output_of("rl", "stdout") == f"77\n{tmp_path / 'work'}\n".encode()


def test_garbage_frame_poisons_until_sync(agent: AgentProc) -> None:
    agent.ok("ping")
    agent.sock.sendall(P.encode_frame({"type": "ping", "id": 50, **P.ping_fields()}) + struct.pack(">I", 5) + b"[1,2]")
    assert agent.wait_for(lambda m: m.get("id") == 50)["ok"]  # decoded before the garbage: served
    assert "not an object" in agent.wait_for(lambda m: m["type"] == "protocol_error")["message"]
    agent.send({"type": "ping", "id": 99, **P.ping_fields()})
    with pytest.raises(TimeoutError):
        agent.wait_for(lambda m: m.get("id") == 99, timeout=0.3)
    agent.sock.sendall(P.SYNC)  # what a reconnecting host sends first
    agent.wait_for(lambda m: m["type"] == P.T_SYNC_MARKER)  # the agent's SYNC marker, then clean frames
    assert agent.ok("ping")["kernel"]
    assert agent.close() == 0  # EOF of the fd channel stops the agent cleanly
    assert "Traceback" not in agent.stderr()


def _queued(sock: socket.socket) -> int:
    """Bytes waiting to be read on ``sock`` (FIONREAD)."""
    import fcntl
    import termios

    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]


def test_sync_mid_frame_drops_the_half_written_frame_and_replays_the_recent_ones(tmp_path: Path) -> None:
    # What a reconnecting host gets again is the last REPLAY_BYTES of frames written (less up
    # to one frame, as whole frames are kept). This host loses what it read before the SYNC
    # (the exec reply's read and the raw read: at most one channelful each) and what sits in
    # the channel when the agent reads the SYNC (one more): a channel of the default size
    # (~212 KiB) could hold more than the replay, and did when the test was off the CPU.
    from hanabi_guest.agent import REPLAY_BYTES

    agent = AgentProc(tmp_path, sndbuf=16 << 10)
    try:
        frame = P.MAX_DATA_CHUNK + 4096  # one output frame at most (a data frame and its header)
        channelful = agent.channel_bytes * 3 // 2  # SO_SNDBUF, and a last skb of up to half of it
        assert 3 * channelful <= REPLAY_BYTES - frame, "the channel outgrew the replay window"
        agent.ok("create_container", container_id="c1", rootfs={"serial": "s"}, process=proc_spec("true"))
        agent.ok("exec", container_id="c1", exec_id="big", process=proc_spec("head", "-c", "20000000", "/dev/zero"))
        assert agent.sock.recv(100_000)  # read part of the stream, leaving the agent mid-frame
        deadline = time.monotonic() + 10  # ...and let it write more, which sits unread at the SYNC
        while not _queued(agent.sock):
            assert time.monotonic() < deadline, "the agent wrote nothing more"
            select.select([agent.sock], [], [], deadline - time.monotonic())
        agent.dec = P.FrameDecoder(wait_sync=True)  # "reconnect": skip everything up to the agent's SYNC
        agent.inbox.clear()
        agent.sock.sendall(P.SYNC)
        agent.wait_for(lambda m: m["type"] == P.T_SYNC_MARKER, timeout=30)
        ex = agent.exit_of("big", timeout=30)  # every frame after the marker decodes cleanly
        assert ex["exit_code"] == 0
        # What the "old host" read raw, and what sat unread in the socket, was written again
        # after the marker (the last REPLAY_BYTES of output): nothing is missing, nothing twice.
        seqs = [m["seq"] for m in agent.inbox if m.get("type") == "output" and m.get("exec_id") == "big"]
        assert seqs == sorted(set(seqs)) and ex["seq"] > seqs[-1]
        assert len(agent.output_of("big", "stdout")) == 20_000_000
        assert agent.close() == 0
    finally:
        agent.close()


def test_event_seq_grows_by_one_per_event_whatever_the_timers(agent: AgentProc) -> None:
    # destroy_container polls with timers while its processes die: they take no seq.
    for cid in ("c1", "c2"):
        agent.ok("create_container", container_id=cid, rootfs={"serial": "s"}, process=proc_spec("true"))
    agent.ok("exec", container_id="c1", exec_id="e1", process=proc_spec("echo", "one"))
    agent.exit_of("e1")
    agent.ok("exec", container_id="c2", exec_id="long", process=proc_spec("sleep", "100"))
    agent.ok("destroy_container", container_id="c2")
    agent.exit_of("long", cid="c2")
    agent.ok("exec", container_id="c1", exec_id="e2", process=proc_spec("echo", "two"))
    agent.exit_of("e2")
    seqs = [m["seq"] for m in agent.seen if m.get("type") in (P.T_OUTPUT, P.T_EXIT)]
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) >= 5, seqs


def test_a_reconnecting_host_gets_recent_output_and_exits_again_with_their_seq(agent: AgentProc) -> None:
    agent.ok("create_container", container_id="c1", rootfs={"serial": "s"}, process=proc_spec("true"))
    agent.ok("exec", container_id="c1", exec_id="e1", process=proc_spec("echo", "hi"))
    first = agent.exit_of("e1")
    out = [m for m in agent.inbox if m.get("type") == "output" and m.get("exec_id") == "e1"]
    agent.dec = P.FrameDecoder(wait_sync=True)  # a new host (agentd restarted)
    agent.inbox.clear()
    agent.sock.sendall(P.SYNC)
    again = agent.exit_of("e1")
    assert again == first
    assert [m for m in agent.inbox if m.get("type") == "output" and m.get("exec_id") == "e1"] == out
    assert agent.ok("ping")["kernel"]


def test_the_sync_request_flushes_and_replies_without_resynchronising(agent: AgentProc) -> None:
    assert agent.ok(P.T_SYNC) == {}
    assert agent.ok("ping")["kernel"]
    assert not [m for m in agent.seen if m["type"] == P.T_SYNC_MARKER]  # no SYNC marker written back


def test_shutdown_replies_then_stops(agent: AgentProc) -> None:
    agent.ok("shutdown")
    assert agent.proc.wait(10) == 0


FLAKY = textwrap.dedent("""
    import sys, time
    from hanabi_guest.agent import Agent
    from hanabi_guest.channel import FdChannel
    from hanabi_guest.sandbox import DirSandbox

    class Flaky(FdChannel):
        '''Looks like virtio-serial without a host for 0.5 s: EOF on read, writes refused.'''
        def __init__(self, fd):
            super().__init__(fd)
            self.retry_delay = 0.05
            self.until = time.monotonic() + 0.5
            self.reads = 0
        def read(self):
            self.reads += 1
            if time.monotonic() < self.until:
                return b""
            return super().read()
        def write(self, data):
            if time.monotonic() < self.until:
                return 0
            return super().write(data)
        def peer_gone(self):
            if time.monotonic() >= self.until:
                self.retry_delay = -1.0

    ch = Flaky(int(sys.argv[1]))
    Agent(ch, DirSandbox("/")).run()
    print("reads", ch.reads, file=sys.stderr)
""")


def test_no_host_connected_backs_off_without_spinning(tmp_path: Path) -> None:
    a = AgentProc(tmp_path, script=FLAKY)
    t0 = time.monotonic()
    assert a.wait_for(lambda m: m["type"] == "ready")["agent_version"]  # queued, then delivered
    assert time.monotonic() - t0 >= 0.3
    assert a.ok("ping")["kernel"]
    assert a.close() == 0
    reads = int(a.stderr().split("reads")[-1])
    assert reads < 40, f"{reads} reads in 0.5 s: spinning"


PORT_LIKE = textwrap.dedent("""
    import os, sys
    from hanabi_guest.agent import Agent
    from hanabi_guest.channel import Channel, _read_fd, _write_fd
    from hanabi_guest.sandbox import DirSandbox

    class PortLike(Channel):
        # Reads a FIFO whose writer comes and goes, as virtio-serial's host does (EOF while
        # none is there); writes go to the test's socket. A wait of 5 s after each EOF.
        retry_delay = 5.0
        def __init__(self, path, fd):
            self.fifo = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            self.out = fd
            self.reads = 0
        def fileno(self):
            return self.fifo
        def read(self):
            self.reads += 1
            return _read_fd(self.fifo)
        def write(self, data):
            return _write_fd(self.out, data)
        def close(self):
            os.close(self.fifo)

    class Noted(Agent):
        def _peer_gone(self):
            super()._peer_gone()
            print("gone", self.chan.reads, file=sys.stderr, flush=True)

    ch = PortLike(os.environ["PORT_FIFO"], int(sys.argv[1]))
    agent = Noted(ch, DirSandbox("/"))
    agent.table["shutdown"] = lambda req_id, msg: setattr(agent, "running", False) or {}
    agent.run()
    print("reads", ch.reads, file=sys.stderr, flush=True)
""")


def test_a_host_that_connects_while_the_agent_backs_off_is_served_at_once(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """After an EOF (no host) the agent looks again only after retry_delay (5 s here), but the
    next host's bytes wake it at once (edge-triggered registration), without spinning."""
    fifo = tmp_path / "port"
    os.mkfifo(fifo)
    monkeypatch.setenv("PORT_FIFO", str(fifo))
    a = AgentProc(tmp_path, script=PORT_LIKE)
    try:
        assert a.wait_for(lambda m: m["type"] == "ready")["agent_version"]
        os.close(os.open(fifo, os.O_WRONLY))  # a host came and went: EOF, the agent backs off
        assert a.proc.stderr is not None
        assert a.proc.stderr.readline().startswith(b"gone")
        writer = os.open(fifo, os.O_WRONLY)  # the next host
        t0 = time.monotonic()
        os.write(writer, P.SYNC + P.encode_frame({"type": "ping", "id": 1, **P.ping_fields()}))
        reply = a.wait_for(lambda m: m.get("type") == "reply" and m.get("id") == 1, timeout=10)
        assert reply["ok"] and time.monotonic() - t0 < 2.5  # not after the 5 s wait
        os.write(writer, P.encode_frame({"type": "shutdown", "id": 2}))
        assert a.proc.wait(10) == 0
        os.close(writer)
        reads = int(a.stderr().split("reads")[-1])
        assert reads < 10, f"{reads} reads: spinning"
    finally:
        a.close()


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/bin/busybox"), reason="needs root and /bin/busybox")
def test_chrooted_exec_with_path_lookup(tmp_path: Path) -> None:
    """The guest path: chroot into the rootfs, $PATH lookup inside it, user switch."""
    import shutil

    tmp_path.chmod(0o755)  # the container's "/" must be traversable by uid 1000
    (tmp_path / "bin").mkdir()
    shutil.copy2("/bin/busybox", tmp_path / "bin/busybox")
    for applet in ("sh", "id", "pwd", "cat"):
        (tmp_path / "bin" / applet).symlink_to("busybox")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\nu:x:1000:1000::/home/u:/bin/sh\n")
    (tmp_path / "home/u").mkdir(parents=True)
    a = AgentProc(tmp_path, extra=("--chroot", "1"))
    spec = {"args": ["sh", "-c", "id -u; id -G; pwd; echo $HOME; exit 3"], "env": ["PATH=/bin"], "cwd": "/home/u",
            "user": {"uid": 1000, "gid": 1000, "additionalGids": [5, 7]}}
    a.ok("create_container", container_id="c1", rootfs={"serial": "s"}, process=spec)
    a.ok("start", container_id="c1")
    assert a.exit_of("init")["exit_code"] == 3
    assert a.output_of("init", "stdout") == b"1000\n1000 5 7\n/home/u\n/home/u\n"
    err = a.err("exec", container_id="c1", exec_id="x", process={**spec, "args": ["python3"]})
    assert "executable file not found in $PATH" in err["message"]  # the host's python3 is out of reach
    assert a.close() == 0


LISTENER = textwrap.dedent("""
    import socket, sys
    from hanabi_guest.agent import Agent
    from hanabi_guest.channel import VsockChannel
    from hanabi_guest.sandbox import DirSandbox

    srv = socket.socket(socket.AF_UNIX)
    srv.bind(sys.argv[1])
    srv.listen(1)
    Agent(VsockChannel(listener=srv), DirSandbox("/")).run()
""")


def test_listener_channel_serves_one_connection_after_another(tmp_path: Path) -> None:
    """VsockChannel's accept / peer-gone / re-accept logic, with a Unix listener standing in."""
    path = str(tmp_path / "agent.sock")
    proc = subprocess.Popen([sys.executable, "-c", LISTENER, path], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(path):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.01)
        for round_ in range(3):
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            s.sendall(P.SYNC + P.encode_frame({"type": "ping", "id": round_, **P.ping_fields()}))
            dec, got = P.FrameDecoder(wait_sync=True), list[Msg]()
            s.settimeout(10)
            while not any(m.get("id") == round_ for m in got):
                got += dec.feed(s.recv(65536))
            kinds = [m["type"] for m in got]
            if round_ == 0:
                # `ready` goes out as soon as a host connects: before our SYNC was read (then the
                # decoder rightly drops it) or after it; the protocol tells hosts not to rely on it.
                assert kinds in ([P.T_SYNC_MARKER, "ready", "reply"], [P.T_SYNC_MARKER, "reply"])
            else:
                assert kinds == [P.T_SYNC_MARKER, "reply"]
            s.close()
    finally:
        proc.kill()
        proc.wait()
    assert proc.stderr is not None and b"Traceback" not in proc.stderr.read()
