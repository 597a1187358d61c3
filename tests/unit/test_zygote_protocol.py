"""The zygote's messages (hanabi_runtime.zygote.protocol) and the spawner's fd mapping,
over real sockets and processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from hanabi_runtime.spawner import spawn_here, wait_here
from hanabi_runtime.zygote import protocol as P


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    yield a, b
    a.close()
    b.close()


def test_a_message_and_its_fds_arrive_together(pair, tmp_path):
    a, b = pair
    target = tmp_path / "f"
    target.write_text("through the fd")
    fd = os.open(target, os.O_RDONLY)
    try:
        P.send(a, P.SPAWN, [fd], argv=["x"], targets=[5], setsid=False)
    finally:
        os.close(fd)
    message, fds = P.recv(b)
    assert message == {"op": P.SPAWN, "argv": ["x"], "targets": [5], "setsid": False}
    assert len(fds) == 1 and not os.get_inheritable(fds[0])
    assert os.read(fds[0], 100) == b"through the fd"
    os.close(fds[0])


@pytest.mark.parametrize("datagram", [b"\xff\xfe", b"[]", b'{"op": 3}', b'{"op": "launch"}'])
def test_malformed_datagrams_are_protocol_errors_and_their_fds_are_closed(pair, datagram):
    a, b = pair
    r, w = os.pipe()
    socket.send_fds(a, [datagram], [r])
    os.close(r)
    with pytest.raises(P.ProtocolError):
        P.recv(b)
    with pytest.raises(BrokenPipeError):  # the copy that came with it was closed: no reader left
        os.write(w, b"x")
    os.close(w)


def test_the_end_of_the_stream_is_closed(pair):
    a, b = pair
    a.close()
    with pytest.raises(P.Closed):
        P.recv(b)


def test_an_oversized_message_is_refused_before_sending(pair):
    a, _ = pair
    with pytest.raises(P.ProtocolError, match="over the"):
        P.send(a, P.RUN, argv=["x" * P.MAX_MESSAGE_BYTES])


def test_field_checks_the_type_and_names_the_field():
    assert P.field({"op": "wait", "pid": 4}, "pid", int) == 4
    for bad in ({"op": "wait"}, {"op": "wait", "pid": "4"}, {"op": "wait", "pid": True}):
        with pytest.raises(P.ProtocolError, match="'pid'"):
            P.field(bad, "pid", int)


def test_spawn_here_gives_each_target_its_source_even_when_they_cross():
    """fds[3] -> our w2, fds[4] -> our w1 where w1/w2 are 3 and 4 or any numbers: each
    child fd gets the right pipe, whatever order the dup2s run in."""
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    targets = {w2: w1, w1: w2}  # swapped on purpose
    code = "import os, sys; os.write(int(sys.argv[1]), b'first'); os.write(int(sys.argv[2]), b'second')"
    pid = spawn_here([sys.executable, "-c", code, str(w2), str(w1)], targets, setsid=False)
    for fd in (w1, w2):
        os.close(fd)
    assert wait_here(pid) == 0
    assert os.read(r1, 100) == b"first"  # written to the child's fd w2, which is our w1
    assert os.read(r2, 100) == b"second"
    os.close(r1)
    os.close(r2)


def test_spawn_here_with_setsid_starts_a_new_session():
    pid = spawn_here([sys.executable, "-c", "import os, sys; sys.exit(0 if os.getsid(0) == os.getpid() else 9)"],
                     {}, setsid=True)
    assert wait_here(pid) == 0


def test_wait_here_reports_a_signal_as_negative():
    proc = subprocess.Popen([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"])
    assert wait_here(proc.pid) == -15
    proc.returncode = -15  # reaped above
