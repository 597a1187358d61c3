"""Each container has its own PID namespace, as under runc (real daemons + VM).

The container's init is PID 1 there; `exec` processes join it; `ps` inside sees only the
container's processes (not the guest agent, not kernel threads); exit statuses and signals
still reach the host. Kernel rule kept as is: the init gets only the signals it has a
handler for, except SIGKILL/SIGSTOP from outside, so its own `kill -9 $$` is ignored.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.hanabi import BIN, leftovers
from tests.integration.test_runtime_tty import tty_bundle

pytestmark = pytest.mark.integration


PS = ["ps", "-o", "pid,ppid,args"]


def ps_rows(output: bytes) -> list[tuple[int, int, str]]:
    """(pid, ppid, args) of each row of busybox `ps -o pid,ppid,args`."""
    lines = output.decode().splitlines()
    assert lines and lines[0].split() == ["PID", "PPID", "COMMAND"], output
    rows = []
    for line in lines[1:]:
        pid, ppid, args = line.split(None, 2)
        rows.append((int(pid), int(ppid), args))
    return rows


def wait_status(hanabi, cid: str, status: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        state = hanabi.runtime("state", cid)
        if state.returncode == 0 and json.loads(state.stdout)["status"] == status:
            return
        assert time.monotonic() < deadline, f"{cid} never became {status}"
        time.sleep(0.3)


def init_status(hanabi, cid: str) -> dict[str, str]:
    """/proc/1/status of the container's namespace (its init), read by an exec."""
    done = hanabi.runtime("exec", cid, "cat", "/proc/1/status")
    assert done.returncode == 0, done.stderr.decode()
    return dict(line.split(":\t", 1) for line in done.stdout.decode().splitlines() if ":\t" in line)


def has_signal(mask: str, sig: signal.Signals) -> bool:
    """Whether hex signal mask `mask` (SigCgt, SigIgn, ... of /proc/PID/status) holds `sig`."""
    return bool(int(mask, 16) >> (sig - 1) & 1)


def test_init_is_pid_1_and_ps_shows_only_the_container(hanabi, bundle, cid):
    script = "echo pid=$$ ppid=$PPID; ps -o pid,ppid,args; exit 3"
    done = hanabi.runtime("run", "--bundle", bundle(["sh", "-c", script]), cid)
    assert done.returncode == 3, done.stderr.decode()
    head, _, table = done.stdout.partition(b"\n")
    assert head == b"pid=1 ppid=0"  # its parent (the agent) is outside the namespace
    rows = ps_rows(table)
    # The shell and its `ps` child (busybox runs the applet in the forked shell: "{ps} sh -c ...").
    assert [(pid, ppid) for pid, ppid, _ in rows] == [(1, 0), (rows[1][0], 1)], rows
    assert rows[0][2] == f"sh -c {script}" and rows[1][2].startswith("{ps} "), rows
    assert not any("python" in args or args.startswith("[") for _, _, args in rows)  # no agent, no kthreads
    assert leftovers(hanabi, cid) == []


@pytest.mark.parametrize("script,status", [("exit 0", 0), ("exit 3", 3),
                                           ('sh -c "kill -9 \\$\\$"; exit $?', 137)])
def test_exit_status_of_the_init(hanabi, bundle, cid, script, status):
    done = hanabi.runtime("run", "--bundle", bundle(["sh", "-c", script]), cid)
    assert done.returncode == status, done.stderr.decode()
    assert leftovers(hanabi, cid) == []


def test_the_init_ignores_its_own_sigkill_like_under_runc(hanabi, bundle, cid):
    done = hanabi.runtime("run", "--bundle", bundle(["sh", "-c", "kill -9 $$; echo survived $$"]), cid)
    assert (done.returncode, done.stdout) == (0, b"survived 1\n"), done.stderr.decode()


def test_exec_joins_the_namespace_and_signals_from_outside(hanabi, bundle, cid):
    run = subprocess.Popen([str(BIN / "hanabi-runtime"), "--config", str(hanabi.config_path),
                            "run", "--bundle", bundle(["sleep", "600"]), cid],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        wait_status(hanabi, cid, "running")
        seen = hanabi.runtime("exec", cid, *PS)
        assert seen.returncode == 0, seen.stderr.decode()
        rows = ps_rows(seen.stdout)
        assert [(args, ppid) for _, ppid, args in rows] == [("sleep 600", 0), (" ".join(PS), 0)], rows
        assert rows[0][0] == 1 and rows[1][0] > 1

        me = hanabi.runtime("exec", cid, "sh", "-c", "echo $$ $PPID; ls -d /proc/[0-9]* >/tmp/l; wc -l </tmp/l; exit 5")
        assert me.returncode == 5, me.stderr.decode()
        pid, ppid, count = me.stdout.split()
        assert int(pid) > 1 and ppid == b"0"  # its parent, the agent, is outside the namespace
        assert int(count) == 2  # /proc of the namespace: sleep (1) and this shell (which expands the glob)
        killed = hanabi.runtime("exec", cid, "sh", "-c", "kill -9 $$")  # not PID 1: it dies
        assert killed.returncode == 137, killed.stderr.decode()

        # The init neither handles, ignores nor blocks SIGTERM (its default action would end
        # it), so the kernel drops it at once, as under runc ...
        status = init_status(hanabi, cid)
        assert not any(has_signal(status[key], signal.SIGTERM) for key in ("SigCgt", "SigIgn", "SigBlk")), status
        hanabi.runtime("kill", cid, "TERM", check=True)
        # ... shown by a SIGSTOP sent after it (always delivered from outside): the init
        # stops, which it cannot do with a SIGTERM delivered (the group exit starts at the
        # kill, and a pending 15 is taken before 19).
        hanabi.runtime("kill", cid, "STOP", check=True)
        deadline = time.monotonic() + 30
        while not (status := init_status(hanabi, cid))["State"].startswith("T"):
            assert time.monotonic() < deadline, f"the init never stopped: {status['State']}"
        assert not has_signal(status["ShdPnd"], signal.SIGTERM) and not has_signal(status["SigPnd"], signal.SIGTERM)
        # ... but SIGKILL from outside is always delivered (to a stopped init too).
        hanabi.runtime("kill", cid, "KILL", check=True)
        assert run.wait(60) == 137, run.stderr.read().decode()
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
            hanabi.runtime("delete", "--force", cid)
    assert leftovers(hanabi, cid) == []


def test_a_trapped_signal_reaches_pid_1_and_its_end_kills_the_namespace(hanabi, bundle, cid, tmp_path):
    run = subprocess.Popen([str(BIN / "hanabi-runtime"), "--config", str(hanabi.config_path), "run", "--bundle",
                            bundle(["sh", "-c", 'trap "exit 7" TERM; while :; do sleep 0.2; done']), cid],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        wait_status(hanabi, cid, "running")
        pid_file = tmp_path / "exec.pid"
        hanabi.runtime("exec", "--detach", "--pid-file", str(pid_file), cid, "sleep", "600", check=True)
        standin = Path(f"/proc/{int(pid_file.read_text())}")
        assert standin.exists()
        hanabi.runtime("kill", cid, "TERM", check=True)  # PID 1 has a handler: delivered
        assert run.wait(60) == 7, run.stderr.read().decode()
        deadline = time.monotonic() + 30
        while standin.exists():  # the exec died with the namespace's PID 1 (its stand-in with it)
            assert time.monotonic() < deadline, "the exec outlived the container's init"
            time.sleep(0.2)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
            hanabi.runtime("delete", "--force", cid)
    assert leftovers(hanabi, cid) == []


def test_terminal_init_is_pid_1(hanabi, bundle, cid):
    path = tty_bundle(bundle, ["sh"])
    done = hanabi.runtime("run", "--bundle", path, cid,
                          input=b"echo pid-$$; tty; ps >/tmp/ps; echo rows-$(wc -l </tmp/ps); exit 4\n")
    assert done.returncode == 4, done.stderr.decode()
    assert b"pid-1\r\n" in done.stdout and b"/dev/pts/" in done.stdout
    assert b"rows-3\r\n" in done.stdout  # header, sh and ps
    assert leftovers(hanabi, cid) == []
