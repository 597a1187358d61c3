"""TTY end to end: `create --console-socket` as containerd's shim calls it, a pty in the guest.

The test plays the shim: it listens on a console socket, receives the pty master that
`create` sends there over SCM_RIGHTS (`ConsoleSocket.receive_master`, checked like go-runc's
`ReceiveMaster`), types into it, resizes it with TIOCSWINSZ and reaps the stand-in as a
child subreaper (which is how the shim gets the container's exit status).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from hanabi_runtime.console import ConsoleSocket, set_winsize
from tests.helpers.hanabi import BIN, leftovers

pytestmark = pytest.mark.integration

# Runs `create` as a child subreaper, as containerd's shim does, so the stand-in (the pid in
# the pid file) becomes its child when `create` exits; reports create's status, then the
# stand-in's exit status.
SUBREAPER = """
import ctypes, os, subprocess, sys
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
pid_file, log, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
with open(log, "ab") as out:
    rc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out).returncode
print("created", rc, flush=True)
if rc == 0:
    pid = int(open(pid_file).read())
    _, status = os.waitpid(pid, 0)
    print("standin", pid, os.waitstatus_to_exitcode(status), flush=True)
"""


def tty_bundle(bundle, args, **process) -> str:
    path = bundle(args)
    config_file = Path(path) / "config.json"
    config = json.loads(config_file.read_text())
    config["process"].update(terminal=True, **process)
    config_file.write_text(json.dumps(config))
    return path


def read_until(fd: int, needle: bytes, timeout: float = 30.0) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{needle!r} did not come out of the pty; got {seen[-2000:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            seen += os.read(fd, 65536)
    return seen


@pytest.fixture
def short_dir():
    path = tempfile.mkdtemp(prefix="htty", dir="/tmp")  # a Unix socket path must stay short
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


def test_console_socket_pty_resize_and_exit_status(hanabi, bundle, cid, short_dir):
    path = tty_bundle(bundle, ["sh"])
    pid_file = short_dir / "pid"
    with ConsoleSocket(str(short_dir / "console.sock")) as console_socket:
        shim = subprocess.Popen([sys.executable, "-c", SUBREAPER, str(pid_file), str(short_dir / "create.log"),
                                 str(BIN / "hanabi-runtime"), "--config", str(hanabi.config_path), "create",
                                 "--bundle", path, "--pid-file", str(pid_file),
                                 "--console-socket", console_socket.path, cid],
                                stdout=subprocess.PIPE)
        try:
            created = shim.stdout.readline()
            assert created == b"created 0\n", (short_dir / "create.log").read_text()
            master = console_socket.receive_master(timeout=10)  # sent during create, as runc does
            try:
                state = hanabi.state(cid)
                assert state["status"] == "created" and state["pid"] == int(pid_file.read_text())
                hanabi.runtime("start", cid, check=True)

                os.write(master, b"echo $((6*7))\n")
                read_until(master, b"42\r\n")  # the guest pty's line discipline: CRLF

                set_winsize(master, 37, 101)  # the shim's resize: SIGWINCH -> stand-in -> guest
                for attempt in range(20):
                    os.write(master, f"stty size; echo asked-$(({attempt}+1))\n".encode())
                    if b"37 101\r\n" in read_until(master, f"asked-{attempt + 1}\r\n".encode()):
                        break
                    time.sleep(0.25)  # the resize is on its way: ask again
                else:
                    raise AssertionError("the window size did not reach the guest")

                os.write(master, b"tty; exit 3\n")
                assert b"/dev/pts/" in read_until(master, b"/dev/pts/")
                reaped = shim.stdout.readline().split()
                assert reaped[0] == b"standin" and int(reaped[1]) == state["pid"]
                assert int(reaped[2]) == 3  # the stand-in exits with the container's status
            finally:
                os.close(master)
        finally:
            if shim.poll() is None:
                shim.kill()
            shim.wait()
    deadline = time.monotonic() + 30
    while hanabi.state(cid)["status"] != "stopped":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    hanabi.runtime("delete", cid, check=True)
    assert leftovers(hanabi, cid) == []


# Start a command with the pty slave on fd 0 as its controlling terminal (a login shell's setup).
ON_TERMINAL = ("import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
               "os.execv(sys.argv[1], sys.argv[1:])")


def test_run_from_a_terminal_is_raw_follows_resizes_and_restores(hanabi, bundle, cid):
    import termios

    path = tty_bundle(bundle, ["sh"])
    master, slave = os.openpty()
    set_winsize(master, 24, 80)
    cooked = termios.tcgetattr(slave)
    run = subprocess.Popen([sys.executable, "-c", ON_TERMINAL, str(BIN / "hanabi-runtime"),
                            "--config", str(hanabi.config_path), "run", "--bundle", path, cid],
                           stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    try:
        os.write(master, b"stty size; echo first-$((1+1))\n")
        assert b"24 80\r\n" in read_until(master, b"first-2\r\n", timeout=60)  # the terminal's size
        assert not termios.tcgetattr(slave)[3] & termios.ECHO  # raw while the container runs
        set_winsize(master, 40, 132)  # the terminal window changes: SIGWINCH
        for attempt in range(20):
            os.write(master, f"stty size; echo again-$(({attempt}+1))\n".encode())
            if b"40 132\r\n" in read_until(master, f"again-{attempt + 1}\r\n".encode()):
                break
            time.sleep(0.25)
        else:
            raise AssertionError("the new window size did not reach the guest")
        os.write(master, b"exit 5\n")
        assert run.wait(60) == 5
        assert termios.tcgetattr(slave) == cooked  # the terminal is as it was
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        os.close(master)
        os.close(slave)
    assert leftovers(hanabi, cid) == []


def test_run_with_a_terminal_and_piped_stdio(hanabi, bundle, cid):
    # No console socket and no tty on stdin: the stand-in relays its stdio as is; the guest
    # pty still echoes and turns LF into CRLF; everything (stderr too) comes out on stdout.
    path = tty_bundle(bundle, ["sh"], consoleSize={"height": 12, "width": 34})
    done = hanabi.runtime("run", "--bundle", path, cid,
                          input=b"stty size; echo err-$((1+1)) >&2; exit 4\n")
    assert done.returncode == 4, done.stderr.decode()
    assert b"12 34\r\n" in done.stdout and b"err-2\r\n" in done.stdout
    assert done.stderr == b""
    assert leftovers(hanabi, cid) == []


def test_console_socket_rules_of_runc(hanabi, bundle, cid, short_dir):
    tty = tty_bundle(bundle, ["sh"])
    plain = bundle(["true"])
    no_socket = hanabi.runtime("create", "--bundle", tty, cid)
    assert no_socket.returncode == 1
    assert b"cannot allocate tty if runc will detach without setting console socket" in no_socket.stderr
    not_tty = hanabi.runtime("create", "--bundle", plain, "--console-socket", str(short_dir / "s"), cid)
    assert not_tty.returncode == 1
    assert b"cannot use console socket if runc will not detach or allocate tty" in not_tty.stderr
    assert hanabi.runtime("state", cid).returncode == 1  # nothing was created
    assert leftovers(hanabi, cid) == []
