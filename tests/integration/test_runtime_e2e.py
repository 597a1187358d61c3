"""The whole slice: hanabi-runtime -> four daemons -> QEMU VM -> guest agent -> container."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.hanabi import BIN, GUEST_DIR, leftovers

pytestmark = pytest.mark.integration


def guest_kernel() -> str:
    return json.loads((GUEST_DIR / "manifest.json").read_text())["kernel_release"]


def test_uname_is_the_guest_kernel(hanabi, bundle, cid):
    done = hanabi.runtime("run", "--bundle", bundle(["uname", "-r"]), cid)
    assert done.returncode == 0, done.stderr.decode()
    release = done.stdout.decode().strip()
    assert release == guest_kernel()
    assert release != platform.release()
    assert leftovers(hanabi, cid) == []


# The container's first process is PID 1 of its namespace, which cannot SIGKILL itself (as
# under runc): the 137 case kills a child shell and passes its status on.
@pytest.mark.parametrize("script,status", [("exit 0", 0), ("exit 3", 3),
                                           ("sh -c 'kill -9 $$'; exit $?", 137)])
def test_exit_status_propagates(hanabi, bundle, cid, script, status):
    done = hanabi.runtime("run", "--bundle", bundle(["sh", "-c", script]), cid)
    assert done.returncode == status, done.stderr.decode()
    assert leftovers(hanabi, cid) == []


def test_stdin_stdout_stderr(hanabi, bundle, cid):
    script = "cat; echo to-stderr >&2; echo done"
    payload = b"hello through the vm\n" * 1000
    done = hanabi.runtime("run", "--bundle", bundle(["sh", "-c", script]), cid, input=payload)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == payload + b"done\n"
    assert done.stderr == b"to-stderr\n"


def test_process_spec_is_honoured(hanabi, bundle, cid):
    path = bundle(["sh", "-c", 'echo "$GREETING"; pwd; id -u; id -g'],
                  env=["PATH=/bin:/usr/bin", "GREETING=konnichiwa"], cwd="/tmp", uid=1000, gid=1001)
    done = hanabi.runtime("run", "--bundle", path, cid)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().split() == ["konnichiwa", "/tmp", "1000", "1001"]


def test_create_start_state_kill_delete(hanabi, bundle, cid, tmp_path):
    pid_file = tmp_path / "pid"
    path = bundle(["sh", "-c", "echo started; sleep 300"])
    # Like containerd's shim: the stand-in keeps the stdio `create` was given, so these are
    # files, not pipes that create's caller would wait on forever.
    with open(tmp_path / "out", "wb") as out, open(tmp_path / "err", "wb") as err:
        created = subprocess.run([str(BIN / "hanabi-runtime"), "--config", str(hanabi.config_path),
                                  "create", "--bundle", path, "--pid-file", str(pid_file), cid],
                                 stdout=out, stderr=err, stdin=subprocess.DEVNULL, timeout=120)
    assert created.returncode == 0, (tmp_path / "err").read_text()
    pid = int(pid_file.read_text())
    state = hanabi.state(cid)
    assert state["status"] == "created" and state["pid"] == pid and state["id"] == cid
    assert Path(f"/proc/{pid}").exists()

    hanabi.runtime("start", cid, check=True)
    assert hanabi.state(cid)["status"] == "running"
    again = hanabi.runtime("start", cid)
    assert again.returncode == 1 and b"not created" in again.stderr

    refused = hanabi.runtime("delete", cid)
    assert refused.returncode == 1 and b"running" in refused.stderr

    hanabi.runtime("kill", cid, "KILL", check=True)
    deadline = time.monotonic() + 30
    while hanabi.state(cid)["status"] != "stopped" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert hanabi.state(cid)["status"] == "stopped"
    # The stand-in exits with the container's status: killed by SIGKILL -> 137.
    os.waitpid(-1, os.WNOHANG)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (tmp_path / "out").read_bytes() == b"started\n"

    hanabi.runtime("delete", cid, check=True)
    assert leftovers(hanabi, cid) == []
    gone = hanabi.runtime("state", cid)
    assert gone.returncode == 1 and b"does not exist" in gone.stderr


def test_kill_running_container_gives_137(hanabi, bundle, cid):
    proc = subprocess.Popen([str(BIN / "hanabi-runtime"), "--config",
                             str(hanabi.config_path), "run", "--bundle", bundle(["sleep", "300"]), cid],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        state = hanabi.runtime("state", cid)
        if state.returncode == 0 and json.loads(state.stdout)["status"] == "running":
            break
        time.sleep(0.3)
    hanabi.runtime("kill", cid, "9", check=True)
    assert proc.wait(60) == 137, proc.stderr.read().decode()
    assert leftovers(hanabi, cid) == []
