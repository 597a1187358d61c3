"""exec, ps, pause/resume, events and update on a running container (real daemons + VM)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.helpers.hanabi import leftovers, processes_mentioning

pytestmark = pytest.mark.integration


@pytest.fixture
def running(hanabi, bundle, cid):
    """A running `sleep` container, deleted afterwards."""
    path = bundle(["sleep", "600"])
    hanabi.runtime("create", "--bundle", path, cid, check=True)
    hanabi.runtime("start", cid, check=True)
    yield cid
    hanabi.runtime("delete", "--force", cid)
    assert leftovers(hanabi, cid) == []


def test_exec_runs_in_the_same_guest(hanabi, running):
    done = hanabi.runtime("exec", running, "sh", "-c", "echo out; echo err >&2; exit 5")
    assert (done.returncode, done.stdout, done.stderr) == (5, b"out\n", b"err\n")
    piped = hanabi.runtime("exec", running, "cat", input=b"via exec\n")
    assert piped.stdout == b"via exec\n"
    # The exec'd process sees the container's own process and filesystem.
    seen = hanabi.runtime("exec", running, "ps")
    assert b"sleep 600" in seen.stdout


def test_exec_detached_with_pid_file_and_ps(hanabi, running, tmp_path):
    pid_file = tmp_path / "exec.pid"
    process = tmp_path / "process.json"
    process.write_text(json.dumps({"args": ["sleep", "500"], "cwd": "/", "user": {"uid": 0, "gid": 0},
                                   "env": ["PATH=/bin"]}))
    done = hanabi.runtime("exec", "--process", str(process), "--detach", "--pid-file", str(pid_file), running)
    assert done.returncode == 0, done.stderr.decode()
    pid = int(pid_file.read_text())
    pids = json.loads(hanabi.runtime("ps", "--format", "json", running, check=True).stdout)
    assert pid in pids and hanabi.state(running)["pid"] in pids
    table = hanabi.runtime("ps", running, check=True).stdout.decode()
    assert "sleep 600" in table and "sleep 500" in table
    stats = json.loads(hanabi.runtime("events", "--stats", running, check=True).stdout)
    assert stats["type"] == "stats" and stats["data"]["memory"]["usage"]["usage"] > 0
    assert stats["data"]["pids"]["current"] >= 2


def test_pause_and_resume(hanabi, running):
    hanabi.runtime("pause", running, check=True)
    assert hanabi.state(running)["status"] == "paused"
    again = hanabi.runtime("pause", running)
    assert again.returncode == 1 and b"not running" in again.stderr
    hanabi.runtime("resume", running, check=True)
    assert hanabi.state(running)["status"] == "running"
    assert hanabi.runtime("exec", running, "true").returncode == 0


def test_update_refuses_a_new_vm_size(hanabi, running):
    same = hanabi.runtime("update", "--resources", "-", running, input=b'{"blockIO": {"weight": 500}}')
    assert same.returncode == 0, same.stderr.decode()
    bigger = hanabi.runtime("update", "--resources", "-", running, input=b'{"memory": {"limit": 1073741824}}')
    assert bigger.returncode == 1 and b"fixed at create" in bigger.stderr
    garbage = hanabi.runtime("update", "--resources", "-", running, input=b"{not json")
    assert garbage.returncode == 1 and b"not valid JSON" in garbage.stderr


def test_delete_force_kills_exec_standins(hanabi, bundle, cid, tmp_path):
    hanabi.runtime("create", "--bundle", bundle(["sleep", "600"]), cid, check=True)
    hanabi.runtime("start", cid, check=True)
    hanabi.runtime("exec", "--detach", cid, "sleep", "600", check=True)
    hanabi.runtime("delete", "--force", cid, check=True)
    deadline = time.monotonic() + 10
    while processes_mentioning(f"[hanabi {cid[:12]}]") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftovers(hanabi, cid) == []


def test_vm_and_standin_are_accounted_in_the_container_cgroup(hanabi, bundle, cid):
    path = bundle(["sleep", "600"])
    config_file = f"{path}/config.json"
    spec = json.loads(open(config_file).read())
    spec["linux"]["cgroupsPath"] = f"/hanabi-test/{cid}"
    open(config_file, "w").write(json.dumps(spec))
    hanabi.runtime("create", "--bundle", path, cid, check=True)
    try:
        state = hanabi.state(cid)
        vm_pid = json.loads((hanabi.config.sandboxes_dir / cid / "hypervisor.json").read_text())["pid"]
        for pid in (state["pid"], vm_pid):
            assert f"/hanabi-test/{cid}" in open(f"/proc/{pid}/cgroup").read()
        recorded = json.loads((hanabi.config.sandboxes_dir / cid / "state.json").read_text())["cgroups"]
        assert recorded
        # The VM joined the cgroup before its guest touched memory: its pages are charged there
        # (a clone's own pages: those it shares with its VM template are charged to vmmd's cgroup)
        usage = [Path(d) / name for d in recorded for name in ("memory.usage_in_bytes", "memory.current")
                 if (Path(d) / name).exists()]
        cloned = json.loads((hanabi.config.sandboxes_dir / cid / "hypervisor.json").read_text())["template"]
        assert usage and int(usage[0].read_text()) > (16 if cloned else 64) << 20, [u.read_text() for u in usage]
    finally:
        hanabi.runtime("delete", "--force", cid, check=True)
    assert not [d for d in recorded if Path(d).exists()]
    for directory in recorded:
        Path(directory).parent.rmdir()  # the test's own parent cgroup
    assert leftovers(hanabi, cid) == []
