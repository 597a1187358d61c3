"""/proc helpers: start times, zombies, pid-reuse-safe kills."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from hanabi_vmmd import proc


def test_parse_stat_with_a_nasty_command_name():
    text = "42 (a) b) (c) S 1 42 42 0 -1 4194560 " + " ".join(["0"] * 12) + " 123456 0 0\n"
    assert proc.parse_stat(text) == ("S", 123456)


def test_own_process_facts():
    me = os.getpid()
    started = proc.start_time(me)
    assert started and started > 0
    assert proc.is_alive(me, started)
    assert proc.is_alive(me, None)
    assert not proc.is_alive(me, started + 1)
    assert proc.cmdline(me)[0].endswith(("python", "python3")) or "python" in proc.cmdline(me)[0]


def test_missing_pid():
    assert proc.start_time(0x3FFFFFFF) is None
    assert not proc.is_alive(0x3FFFFFFF, None)
    assert not proc.is_alive(-1, None)
    assert proc.cmdline(0x3FFFFFFF) == []
    assert not proc.kill_verified(0x3FFFFFFF, None)


def test_zombie_counts_as_gone_and_kill_checks_start_time():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = proc.start_time(child.pid)
        assert not proc.kill_verified(child.pid, started + 1)  # "another" process: untouched
        assert child.poll() is None
        assert proc.kill_verified(child.pid, started, signal.SIGKILL)
        assert proc.wait_gone(child.pid, started, 5.0)  # a zombie until we reap it
        assert not proc.is_alive(child.pid, started)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -9


def test_exit_status_convention():
    assert proc.exit_status(None) is None
    assert proc.exit_status(0) == 0
    assert proc.exit_status(3) == 3
    assert proc.exit_status(-9) == 137
    assert proc.exit_status(-15) == 143


def test_wait_exited_wakes_on_the_exit_of_a_child_and_leaves_it_to_reap():
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert proc.wait_exited(child.pid, 0.05) is False  # still running
        child.kill()
        assert proc.wait_exited(child.pid, 5) is True
        assert child.returncode is None  # a zombie: the caller reaps it
        assert child.wait() == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert proc.wait_exited(child.pid, 0.05) is True  # reaped: nothing left to wait for
