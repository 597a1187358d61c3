"""hanabi_runtime.console: the console socket (SCM_RIGHTS), host ptys, raw mode, resizes.

The receiving side is written here the way containerd does it (go-runc `ReceiveMaster` ->
runc `utils.RecvFd`): one recvmsg with a 4096-byte data buffer and room for exactly one
fd; fewer than 4096 bytes of name, exactly CMSG_SPACE(4) bytes of control data, one
SCM_RIGHTS message carrying one fd.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
import sys
import termios
import textwrap
import time
from pathlib import Path

import pytest

from hanabi_common.errors import InvalidArgument
from hanabi_runtime import console


def containerd_recv_fd(conn: socket.socket) -> tuple[int, bytes]:
    """runc's RecvFd, transcribed: the checks containerd's shim applies to the master."""
    space = socket.CMSG_SPACE(4)
    name, ancillary, flags, _ = conn.recvmsg(4096, space)
    assert len(name) < 4096, "recvfd: incorrect number of bytes read"
    assert not flags & socket.MSG_CTRUNC
    assert len(ancillary) == 1, "recvfd: number of SCMs is not 1"
    level, kind, data = ancillary[0]
    assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
    assert len(data) == 4, "recvfd: number of fds is not 1"
    return struct.unpack("i", data)[0], name


def read_for(fd: int, needle: bytes, timeout: float = 10.0) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{needle!r} did not arrive; got {seen!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    return seen


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "console.sock")


def test_pty_master_goes_over_scm_rights_as_containerd_expects(sock_path: str) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(1)
    master, slave = os.openpty()
    console.send_fd(sock_path, master)  # connects, sends, closes: the message waits in the socket
    os.close(master)
    conn, _ = listener.accept()
    received, name = containerd_recv_fd(conn)
    conn.close()
    listener.close()
    assert name == b"/dev/ptmx"  # what runc sends: the master's file name
    try:
        os.write(received, b"typed\n")
        assert read_for(slave, b"typed\n") == b"typed\n"  # it is the very master of our slave
        console.set_winsize(received, 33, 77)  # what the shim's Resize does
        assert console.get_winsize(slave) == (33, 77)
    finally:
        os.close(received)
        os.close(slave)


def test_console_socket_receives_and_checks(sock_path: str) -> None:
    with console.ConsoleSocket(sock_path) as cs:
        r, w = os.pipe()
        console.send_fd(sock_path, w, name="pipe")
        fd = cs.receive_master(timeout=5)
        os.write(fd, b"x")
        assert os.read(r, 1) == b"x"
        assert os.get_inheritable(fd) is False
        for f in (fd, r, w):
            os.close(f)
        # Two fds, or none: refused like RecvFd does, and nothing leaks.
        for fds in ([0, 1], []):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.connect(sock_path)
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
            client.sendmsg([b"/dev/ptmx"], anc)
            client.close()
            before = len(os.listdir("/proc/self/fd"))
            with pytest.raises(ValueError, match="one SCM_RIGHTS"):
                cs.receive_master(timeout=5)
            assert len(os.listdir("/proc/self/fd")) == before
    assert not os.path.exists(sock_path)


def test_send_fd_errors(sock_path: str) -> None:
    with pytest.raises(FileNotFoundError):
        console.send_fd(sock_path, 0)
    with pytest.raises(ValueError):
        console.send_fd(sock_path, 0, name="x" * 4096)


@pytest.mark.parametrize("terminal,socket_path,detach,expect", [
    (False, None, True, []),
    (False, None, False, []),
    (True, "/run/x.sock", True, ["--console-socket", "/run/x.sock"]),
    (True, None, False, ["--tty"]),
    (True, None, True, "cannot allocate tty if runc will detach without setting console socket"),
    (False, "/run/x.sock", True, "cannot use console socket if runc will not detach or allocate tty"),
    (True, "/run/x.sock", False, "cannot use console socket if runc will not detach or allocate tty"),
])
def test_standin_args_follow_runc(terminal, socket_path, detach, expect) -> None:
    if isinstance(expect, str):
        with pytest.raises(InvalidArgument, match=expect):
            console.standin_args(terminal, socket_path, detach)
    else:
        assert console.standin_args(terminal, socket_path, detach) == expect


def test_relative_console_socket_is_made_absolute(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    assert console.standin_args(True, "c.sock", True) == ["--console-socket", str(tmp_path / "c.sock")]


def test_make_raw_and_restore() -> None:
    master, slave = os.openpty()
    try:
        cooked = termios.tcgetattr(slave)
        assert cooked[3] & termios.ECHO and cooked[3] & termios.ICANON
        saved = console.make_raw(slave)
        raw = termios.tcgetattr(slave)
        assert not raw[3] & (termios.ECHO | termios.ICANON | termios.ISIG)
        assert not raw[1] & termios.OPOST and not raw[0] & termios.ICRNL
        assert raw[6][termios.VMIN] == 1
        console.restore(slave, saved)
        assert termios.tcgetattr(slave) == cooked
        with console.terminal_restored(slave):
            console.make_raw(slave)
        assert termios.tcgetattr(slave) == cooked
    finally:
        os.close(master)
        os.close(slave)


# A stand-in in miniature: setup_console + ConsoleRelay.relay with a fake io stream that
# echoes input upper-cased and reports resizes in-band; it "exits" with 7 on a 'q'.
FAKE_STANDIN = textwrap.dedent("""
    import os, sys
    from hanabi_runtime.console import setup_console

    class FakeStream:
        out = None
        def resize(self, height, width):
            os.write(self.out, f"<resize {height} {width}>".encode())
        def relay(self, stdin_fd, stdout_fd, stderr_fd):
            seen = b""
            while b"q" not in seen:
                chunk = os.read(stdin_fd, 100)
                seen += chunk
                os.write(stdout_fd, chunk.upper())
            return 7

    mode = sys.argv[1]
    report = os.dup(2)  # setup_console lets go of stdio in socket mode: keep a way to talk
    if mode == "socket":
        relay = setup_console(sys.argv[2], None)
        # create's caller waits for its pipes to close: the stand-in must not hold them
        assert all(os.readlink(f"/proc/self/fd/{fd}") == "/dev/null" for fd in (0, 1, 2))
    else:  # our stdin is a terminal: make it our controlling one, as a login shell has it
        import fcntl, termios
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        relay = setup_console(None, 0, 1)
    stream = FakeStream()
    stream.out = relay.out_fd
    os.write(report, b"ready\\n")
    sys.exit(relay.relay(stream))
""")


def test_console_socket_relay_follows_the_shims_resizes(sock_path: str) -> None:
    with console.ConsoleSocket(sock_path) as cs:
        proc = subprocess.Popen([sys.executable, "-c", FAKE_STANDIN, "socket", sock_path],
                                stderr=subprocess.PIPE)
        try:
            master = cs.receive_master(timeout=10)
            assert proc.stderr.readline() == b"ready\n"
            console.set_winsize(master, 40, 120)  # the kernel sends the stand-in SIGWINCH
            assert b"<resize 40 120>" in read_for(master, b"<resize 40 120>")
            os.write(master, b"hi\n")
            # Raw slave: no echo of "hi", no CR added to the newline (the guest pty does that).
            out = read_for(master, b"HI\n")
            assert b"hi" not in out and b"HI\r\n" not in out
            console.set_winsize(master, 41, 121)
            assert b"<resize 41 121>" in read_for(master, b"<resize 41 121>")
            os.write(master, b"q")
            assert proc.wait(10) == 7
            os.close(master)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_own_terminal_goes_raw_follows_sigwinch_and_is_restored() -> None:
    master, slave = os.openpty()
    console.set_winsize(master, 24, 80)
    cooked = termios.tcgetattr(slave)
    proc = subprocess.Popen([sys.executable, "-c", FAKE_STANDIN, "tty"], stdin=slave, stdout=slave,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stderr.readline() == b"ready\n"
        assert b"<resize 24 80>" in read_for(master, b"<resize 24 80>")  # the size it has at start
        assert not termios.tcgetattr(slave)[3] & termios.ECHO  # raw while relaying
        console.set_winsize(master, 50, 100)
        assert b"<resize 50 100>" in read_for(master, b"<resize 50 100>")
        os.write(master, b"q")
        assert proc.wait(10) == 7
        assert termios.tcgetattr(slave) == cooked  # restored on the way out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        os.close(slave)


def test_no_terminal_on_stdin_relays_plainly() -> None:
    r, w = os.pipe()
    relay = console.setup_console(None, r, w)
    assert (relay.in_fd, relay.out_fd, relay.size_fd, relay.raw_fd) == (r, w, None, None)
    os.close(r)
    os.close(w)
