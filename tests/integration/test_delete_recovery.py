"""`delete` always finishes (issue 13): for a container whose daemons are down at delete
time (each finishes its part when it starts), and for one whose VMM crashed (it reads as
stopped, killed: status 137, and deletes cleanly)."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from hanabi_agentd.client import AgentdClient
from hanabi_common.netns import create_netns
from hanabi_runtime.demo_bundle import make_bundle
from tests.helpers.hanabi import daemons_for_test, leftovers

pytestmark = pytest.mark.integration


@pytest.fixture
def daemons(tmp_path):
    with daemons_for_test(tmp_path / "hanabi") as started:
        yield started


def _running(daemons, tmp_path, cid: str) -> None:
    bundle = make_bundle(tmp_path / f"bundle-{cid}", ["sh", "-c", "while true; do sleep 1; done"])
    daemons.runtime("create", "--bundle", str(bundle), "--pid-file", str(tmp_path / f"{cid}.pid"), cid, check=True)
    daemons.runtime("start", cid, check=True)


def test_delete_while_daemons_are_down_is_finished_by_them_at_start(daemons, tmp_path):
    cid = "orphaned"
    _running(daemons, tmp_path, cid)
    try:
        for name in ("vmmd", "blockd", "netd"):
            daemons.stop(name, sig=signal.SIGKILL)
        started = time.monotonic()
        done = daemons.runtime("delete", "--force", cid)
        assert done.returncode == 0, done.stderr.decode()
        assert time.monotonic() - started < 20, "delete waited for the daemons that are down"
        marker = json.loads((daemons.config.sandboxes_dir / cid / "disowned.json").read_text())
        assert marker["pending"] == ["blockd", "netd", "vmmd"]
        # And a namespace of netd's that nothing records (a crash between making and recording it).
        stray = daemons.config.run_dir / "netns" / "stray0123456789"
        create_netns(str(stray))
        for name in ("vmmd", "blockd", "netd"):
            daemons.start(name)  # each reconciles before it serves
        assert leftovers(daemons, cid) == []
        assert not stray.exists()
        for name in ("vmmd", "blockd", "netd"):
            log = (daemons.root / f"{name}.log").read_text()
            assert "removed what a container deleted while this daemon was down left" in log, name
    finally:
        daemons.runtime("delete", "--force", cid)


def test_a_container_whose_vmm_crashed_reads_stopped_137_and_deletes(daemons, tmp_path):
    cid = "crashed"
    _running(daemons, tmp_path, cid)
    try:
        vm = json.loads((daemons.config.sandboxes_dir / cid / "hypervisor.json").read_text())
        os.kill(vm["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while daemons.state(cid)["status"] != "stopped":
            assert time.monotonic() < deadline, "the container still reads as running"
            time.sleep(0.2)
        init = AgentdClient(daemons.config).state(cid, cid).processes[0]
        assert init.exit_status == 137
        standin = int((tmp_path / f"{cid}.pid").read_text())
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{standin}") and "zombie" not in open(f"/proc/{standin}/status").read():
            assert time.monotonic() < deadline, "the stand-in did not end with its VM"
            time.sleep(0.1)
        done = daemons.runtime("delete", cid)  # stopped: no --force needed
        assert done.returncode == 0, done.stderr.decode()
        assert leftovers(daemons, cid) == []
    finally:
        daemons.runtime("delete", "--force", cid)


def test_delete_force_of_a_container_whose_stand_in_is_gone(daemons, tmp_path):
    cid = "no-standin"
    _running(daemons, tmp_path, cid)
    try:
        standin = int((tmp_path / f"{cid}.pid").read_text())
        os.kill(standin, signal.SIGKILL)
        done = daemons.runtime("delete", "--force", cid)
        assert done.returncode == 0, done.stderr.decode()
        assert leftovers(daemons, cid) == []
    finally:
        daemons.runtime("delete", "--force", cid)
