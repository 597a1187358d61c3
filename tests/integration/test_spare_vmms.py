"""Spare clone VMMs (vmm.spare_vmms, on by default): after a clone, vmmd starts a QEMU for the
same template that waits for its state in SCHED_IDLE; the next clone takes it (its pid is the
container's VM, back in the normal policy, its writes reach the host through the spare's share),
another spare is started; a vmmd SIGKILL or stop leaves no spare behind. Real QEMU, real daemons."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from hanabi_runtime.demo_bundle import make_bundle
from hanabi_vmmd import proc
from hanabi_vmmd.client import VmmdClient
from tests.helpers.hanabi import daemons_for_test, leftovers, unrecorded_vmms

pytestmark = pytest.mark.integration
WAIT_S = 60.0


@pytest.fixture(scope="module")
def daemons(tmp_path_factory):
    with daemons_for_test(tmp_path_factory.mktemp("hanabi")) as daemons:
        yield daemons


def spare_records(daemons) -> list[dict]:
    return [json.loads(p.read_text()) for p in (daemons.config.run_dir / "spares").glob("*/hypervisor.json")]


def ready_spares(daemons) -> float:
    text = VmmdClient(daemons.config).rpc.call("metrics", {})["text"]
    line = next(x for x in text.splitlines() if x.startswith("hanabi_spare_vmms_ready{"))
    return float(line.rsplit(" ", 1)[1])


def wait_for_a_spare(daemons, other_than: int | None = None) -> dict:
    """The record of a spare vmmd reports ready (not the process `other_than`)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        records = [r for r in spare_records(daemons) if r["pid"] != other_than]
        if records and ready_spares(daemons) >= 1:
            return records[0]
        time.sleep(0.05)
    raise AssertionError(f"no spare vmm became ready within {WAIT_S:.0f}s: {spare_records(daemons)}")


def policies(pid: int) -> set[int]:
    return {os.sched_getscheduler(int(t)) for t in os.listdir(f"/proc/{pid}/task")}


def record(daemons, cid: str) -> dict:
    return json.loads((daemons.config.sandboxes_dir / cid / "hypervisor.json").read_text())


def test_a_clone_takes_the_spare_and_another_is_started(daemons, tmp_path):
    first = make_bundle(tmp_path / "first", ["true"])
    daemons.runtime("run", "--bundle", str(first), "spare-first", check=True)
    spare = wait_for_a_spare(daemons)
    assert proc.is_alive(spare["pid"], spare["start_time"])
    assert policies(spare["pid"]) == {os.SCHED_IDLE}, "a waiting spare must not compete for the CPU"

    bundle = make_bundle(tmp_path / "b", ["sh", "-c", "echo written-in-a-spare > /out.txt; echo hello"])
    run = daemons.runtime("run", "--bundle", str(bundle), "spare-second", check=True)
    assert run.stdout == b"hello\n"
    assert (bundle / "rootfs" / "out.txt").read_text() == "written-in-a-spare\n"

    vmmd_log = (daemons.root / "vmmd.log").read_text().splitlines()
    created = [json.loads(line) for line in vmmd_log if '"vm created"' in line and '"spare-second"' in line]
    assert [c["pid"] for c in created] == [spare["pid"]], created
    assert created[0]["spare"] is not None

    replacement = wait_for_a_spare(daemons, other_than=spare["pid"])
    assert replacement["vm_dir"] != spare["vm_dir"]
    for cid in ("spare-first", "spare-second"):
        assert leftovers(daemons, cid) == []


def test_a_claimed_spare_runs_at_the_normal_policy_in_the_containers_dirs(daemons, tmp_path):
    spare = wait_for_a_spare(daemons)
    bundle = make_bundle(tmp_path / "b", ["sleep", "60"])
    daemons.runtime("create", "--bundle", str(bundle), "spare-sleep", check=True)
    try:
        vm = record(daemons, "spare-sleep")
        assert (vm["pid"], vm["start_time"]) == (spare["pid"], spare["start_time"])
        assert (vm["vm_dir"], vm["share_dir"]) == (spare["vm_dir"], spare["share_dir"])
        assert policies(vm["pid"]) == {os.SCHED_OTHER}
        assert all(os.getpriority(os.PRIO_PROCESS, int(t)) == 0 for t in os.listdir(f"/proc/{vm['pid']}/task"))
        daemons.runtime("start", "spare-sleep", check=True)
        out = daemons.runtime("exec", "spare-sleep", "sh", "-c", "echo exec-in-a-spare", check=True)
        assert out.stdout == b"exec-in-a-spare\n"
    finally:
        daemons.runtime("delete", "--force", "spare-sleep")
    assert leftovers(daemons, "spare-sleep") == []


def test_vmmd_sigkill_then_restart_kills_the_old_spare(daemons, tmp_path):
    spare = wait_for_a_spare(daemons)
    daemons.stop("vmmd", signal.SIGKILL)
    assert proc.is_alive(spare["pid"], spare["start_time"]), "the spare outlives vmmd until the next one starts"
    daemons.start("vmmd")
    assert proc.wait_gone(spare["pid"], spare["start_time"], 10.0), "the restarted vmmd did not kill the old spare"
    assert not Path(spare["vm_dir"]).exists()
    assert not (spare["share_dir"] and Path(spare["share_dir"]).exists())
    assert all(r["pid"] != spare["pid"] for r in spare_records(daemons))

    bundle = make_bundle(tmp_path / "b", ["true"])
    daemons.runtime("run", "--bundle", str(bundle), "spare-after-restart", check=True)
    fresh = wait_for_a_spare(daemons)
    assert leftovers(daemons, "spare-after-restart") == []

    daemons.stop("vmmd")  # a vmmd that stops kills its spares (they are never re-adopted)
    assert proc.wait_gone(fresh["pid"], fresh["start_time"], 10.0)
    assert spare_records(daemons) == []
    assert unrecorded_vmms(daemons.config) == []
    daemons.start("vmmd")
