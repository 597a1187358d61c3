"""Each hot command on a real container (real daemons and VM), as containerd's shim runs them:
a fresh interpreter per call, and none of pydantic, typer, click, jsonschema or pyzmq
imported on the way (issue 14: the import set is guarded, not a time); `delete` too, and a
clean `delete` (every daemon up, nothing to warn about) imports neither logging nor what
would cost it more than its work (DELETE_SPARES)."""

from __future__ import annotations

import json

import pytest

from tests.helpers.hanabi import leftovers
from tests.helpers.lean import heavy_imports, run_cli

pytestmark = pytest.mark.integration
DELETE_SPARES = {"logging", "dataclasses", "shutil", "signal", "pathlib", "hanabi_runtime.pod"}


def test_every_hot_command_on_a_real_container_stays_lean(hanabi, bundle, cid, tmp_path):
    path = bundle(["sleep", "600"])
    hanabi.runtime("create", "--bundle", path, cid, check=True)
    log = tmp_path / "log.json"
    globals_ = ["--config", str(hanabi.config_path), "--root", "/run/containerd/runc/moby",
                "--log", str(log), "--log-format", "json", "--systemd-cgroup"]

    def lean(*args):
        done, modules = run_cli([*globals_, *args])
        assert heavy_imports(modules) == [], args
        assert done.returncode == 0, (args, done.stderr.decode())
        return done.stdout.decode()

    try:
        assert json.loads(lean("state", cid))["status"] == "created"
        lean("start", cid)
        assert json.loads(lean("state", cid))["status"] == "running"
        assert "sleep 600" in lean("ps", cid)
        assert json.loads(lean("ps", "--format", "json", cid)) == [json.loads(lean("state", cid))["pid"]]
        stats = json.loads(lean("events", "--stats", cid))
        assert stats["type"] == "stats" and stats["data"]["pids"]["current"] >= 1
        lean("pause", cid)
        assert json.loads(lean("state", cid))["status"] == "paused"
        lean("resume", cid)
        lean("kill", cid, "KILL")
        for _ in range(100):
            if json.loads(lean("state", cid))["status"] == "stopped":
                break
        assert json.loads(lean("state", cid))["status"] == "stopped"
        again, modules = run_cli([*globals_, "kill", cid, "TERM"])  # agentd refuses, then asked why
        assert (again.returncode, again.stderr.decode()) == \
            (1, f"hanabi-runtime: failed_precondition: container {cid} is stopped (container not running): cannot send it a signal\n")
        assert heavy_imports(modules) == []
        deleted, modules = run_cli([*globals_, "delete", cid])
        assert deleted.returncode == 0, deleted.stderr.decode()
        assert heavy_imports(modules) == [] and modules & DELETE_SPARES == set()
        assert leftovers(hanabi, cid) == []  # drains the daemons' release queues first
        refused, modules = run_cli([*globals_, "state", cid])
        assert refused.returncode == 1 and heavy_imports(modules) == []
        assert refused.stderr.decode() == f"hanabi-runtime: not_found: container {cid} does not exist\n"
        assert json.loads(log.read_text().splitlines()[-1])["msg"] == f"container {cid} does not exist"
    finally:
        hanabi.runtime("delete", "--force", cid)


def test_delete_force_of_a_running_container_stays_lean(hanabi, bundle, cid, tmp_path):
    """bench/cli.py's `delete --force`: a running container, the guest asked to flush."""
    hanabi.runtime("create", "--bundle", bundle(["sleep", "600"]), cid, check=True)
    try:
        done, modules = run_cli(["--config", str(hanabi.config_path), "start", cid])
        assert done.returncode == 0 and heavy_imports(modules) == [], done.stderr.decode()
        done, modules = run_cli(["--config", str(hanabi.config_path), "delete", "--force", cid])
        assert done.returncode == 0, done.stderr.decode()
        assert heavy_imports(modules) == [] and modules & DELETE_SPARES == set()
        assert leftovers(hanabi, cid) == []
    finally:
        hanabi.runtime("delete", "--force", cid)
