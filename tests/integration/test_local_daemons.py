"""`make up` / `make down` without systemd (deploy/local/hanabi-daemons), with real daemons.

Issue 13 saw `make up` fail once after a kill -9 of vmmd. One way it can: the dead daemon's
pid file names a pid the kernel has since given to another process, the script takes that
for the daemon, does not start it, and then waits in vain for an answer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from hanabi_common.config import DAEMONS
from tests.helpers.hanabi import GUEST_DIR, processes_mentioning

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "local" / "hanabi-daemons"
BIN = ROOT / ".venv" / "bin"


@pytest.fixture
def local(tmp_path: Path):
    """Run the script against a private config, run dir and log dir; stop everything after."""
    run_dir = tmp_path / "run"
    config = tmp_path / "hanabi.toml"
    config.write_text(f'run_dir = "{run_dir}"\n[vmm]\nguest_dir = "{GUEST_DIR}"\n'
                      f'[block]\nvolume_dir = "{tmp_path}/volumes"\n')
    env = {**os.environ, "HANABI_CONFIG": str(config), "HANABI_RUN_DIR": str(run_dir),
           "HANABI_LOG_DIR": str(tmp_path / "log"), "HANABI_BIN": str(BIN)}

    def script(command: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(SCRIPT), command], env=env, capture_output=True, text=True, timeout=300)

    try:
        yield script, run_dir
    finally:
        script("stop")
        for pid in processes_mentioning(str(config)) + processes_mentioning(f"{run_dir}/"):
            os.kill(pid, signal.SIGKILL)


def _pid(run_dir: Path, daemon: str) -> int:
    return int((run_dir / f"{daemon}.pid").read_text())


def _wait_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
        assert time.monotonic() < deadline, f"pid {pid} still alive"
        time.sleep(0.05)


def test_up_after_a_kill_9_even_when_the_stale_pid_was_reused(local):
    script, run_dir = local
    started = script("start")
    assert started.returncode == 0, started.stderr
    assert all(f"hanabi-{d} answers" in started.stdout for d in DAEMONS), started.stdout
    assert script("status").returncode == 0

    vmmd = _pid(run_dir, "vmmd")
    os.kill(vmmd, signal.SIGKILL)
    _wait_gone(vmmd)
    down = script("status")
    assert down.returncode == 3 and "hanabi-vmmd: stopped" in down.stdout, down.stdout

    # The stale pid now belongs to some other process.
    impostor = subprocess.Popen(["sleep", "300"])
    try:
        (run_dir / "vmmd.pid").write_text(f"{impostor.pid}\n")
        again = script("start")
        assert again.returncode == 0, again.stdout + again.stderr
        assert "started hanabi-vmmd" in again.stdout and "hanabi-vmmd answers" in again.stdout, again.stdout
        assert "hanabi-netd already running" in again.stdout, again.stdout
        assert _pid(run_dir, "vmmd") != impostor.pid
        assert impostor.poll() is None  # not mistaken for the daemon by `stop` either
    finally:
        impostor.kill()
        impostor.wait()

    pids = [_pid(run_dir, d) for d in DAEMONS]
    stopped = script("stop")
    assert stopped.returncode == 0, stopped.stderr
    for pid in pids:
        _wait_gone(pid)
    assert not list(run_dir.glob("*.pid")) and not list(run_dir.glob("*.sock"))
