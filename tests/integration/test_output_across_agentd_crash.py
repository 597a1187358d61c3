"""What a container writes while agentd is killed -9 reaches its stand-in, every byte in
order; and what it reads from its stdin meanwhile reaches it, every byte once.

The worst case is made on purpose: agentd is stopped (SIGSTOP) while the container writes,
so everything between the guest and agentd fills up (the guest's port, QEMU's chardev,
the unix socket QEMU writes into and agentd no longer reads: until its queue stops
growing), then it is SIGKILLed and
started again. The bytes in that socket die with agentd; the guest replays what it sent
last (`hanabi_wire.REPLAY_BYTES`) and the stand-in drops what it had by `seq`. The other
way the stand-in keeps the stdin it sent last (`STDIN_REPLAY_BYTES`) and sends it again,
and the guest drops what it had by offset.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time

import pytest

from tests.helpers.hanabi import BIN, daemons_for_test, leftovers

pytestmark = pytest.mark.integration
LINES = 400_000  # about 2.6 MB of output, well past every buffer on the way


def unread_bytes(pid: int) -> int:
    """Bytes waiting in the receive queues of the unix sockets process `pid` holds."""
    listed = subprocess.run(["ss", "-xpn"], capture_output=True, text=True, check=True).stdout
    total = 0
    for line in listed.splitlines():
        fields = line.split()
        if f"pid={pid}," in line and len(fields) > 2 and fields[2].isdigit():
            total += int(fields[2])
    return total


def wait_until_full(pid: int, timeout: float = 60.0) -> int:
    """Until the unread bytes of stopped `pid` are there and have stopped growing (the
    sender blocked): that amount."""
    deadline = time.monotonic() + timeout
    last, steady = -1, 0
    while steady < 10:
        assert time.monotonic() < deadline, f"the queue of {pid} did not settle (last {last} bytes)"
        now = unread_bytes(pid)
        steady = steady + 1 if now == last and now > 0 else 0
        last = now
        time.sleep(0.1)
    return last


def kill_agentd_when_full(daemons, cid: str, doing: str) -> tuple[int, float]:
    """Stop agentd, wait until its sockets are full, kill it -9 (what they held dies with
    it), start it again and wait until container `cid` stopped: the bytes that were unread,
    and the deadline (from the restart) that wait kept to."""
    agentd = daemons.procs["agentd"]
    os.kill(agentd.pid, signal.SIGSTOP)
    queued = wait_until_full(agentd.pid)
    daemons.stop("agentd", sig=signal.SIGKILL)
    daemons.start("agentd")
    deadline = time.monotonic() + 120
    while daemons.state(cid)["status"] != "stopped":
        assert time.monotonic() < deadline, f"the container did not finish {doing}"
        time.sleep(0.2)
    return queued, deadline


@pytest.fixture
def daemons(tmp_path):
    with daemons_for_test(tmp_path / "hanabi") as started:
        yield started


def test_output_written_while_agentd_is_killed_arrives_whole(daemons, bundle, tmp_path):
    cid = "writer"
    out = tmp_path / "out"
    # The container writes as fast as it can once started.
    path = bundle(["sh", "-c", f"seq 1 {LINES}"])
    with out.open("wb") as handle:
        subprocess.run([str(BIN / "hanabi-runtime"), "--config", str(daemons.config_path), "create",
                        "--bundle", path, "--pid-file", str(tmp_path / "pid"), cid], stdout=handle, stderr=subprocess.DEVNULL,
                       stdin=subprocess.DEVNULL, check=True, timeout=120)
    agentd = daemons.procs["agentd"]
    try:
        daemons.runtime("start", cid, check=True)
        queued, deadline = kill_agentd_when_full(daemons, cid, "writing")
        assert queued > 0
        standin = int((tmp_path / "pid").read_text())
        while os.path.exists(f"/proc/{standin}") and "zombie" not in open(f"/proc/{standin}/status").read():
            assert time.monotonic() < deadline, "the stand-in did not end"
            time.sleep(0.1)
    finally:
        if agentd.poll() is None:
            os.kill(agentd.pid, signal.SIGCONT)
        daemons.runtime("delete", "--force", cid)
    lines = out.read_bytes().decode().splitlines()
    expected = [str(n) for n in range(1, LINES + 1)]
    if lines != expected:
        missing = sorted(set(expected) - set(lines), key=int)
        pytest.fail(f"{len(lines)} lines arrived of {LINES} ({queued} bytes were unread by agentd when "
                    f"it was killed): {len(missing)} missing, first {missing[:3]}, last {missing[-3:]}")
    assert leftovers(daemons, cid) == []


def test_stdin_sent_while_agentd_is_killed_arrives_whole_and_once(daemons, bundle, tmp_path):
    cid = "reader"
    data = os.urandom(3 << 20)
    given = tmp_path / "in"
    given.write_bytes(data)
    out = tmp_path / "out"
    with out.open("wb") as handle, given.open("rb") as stdin:
        subprocess.run([str(BIN / "hanabi-runtime"), "--config", str(daemons.config_path), "create",
                        "--bundle", bundle(["md5sum"]), cid], stdout=handle, stderr=subprocess.DEVNULL,
                       stdin=stdin, check=True, timeout=120)
    agentd = daemons.procs["agentd"]
    try:
        daemons.runtime("start", cid, check=True)
        queued, _ = kill_agentd_when_full(daemons, cid, "reading")  # the stand-in's stdin, unread
    finally:
        if agentd.poll() is None:
            os.kill(agentd.pid, signal.SIGCONT)
        daemons.runtime("delete", "--force", cid)
    assert out.read_text().split()[:1] == [hashlib.md5(data).hexdigest()], f"{queued} bytes were unread"
    assert leftovers(daemons, cid) == []
