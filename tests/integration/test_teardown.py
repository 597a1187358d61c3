"""Teardown off the critical path (issue 14): `delete` returns once the VM is dead and the
rest is recorded in the daemons' release queues; the daemons finish it in the background,
a daemon killed -9 in between finishes it at its next start, and an id can be taken again
at once (Docker's restart)."""

from __future__ import annotations

import json
import signal
import subprocess

import pytest

from hanabi_runtime.demo_bundle import make_bundle
from hanabi_runtime.procs import is_same_process_alive
from tests.helpers.hanabi import daemons_for_test, leftovers

pytestmark = pytest.mark.integration


@pytest.fixture
def daemons(tmp_path):
    # A block root volume: a loop device on its file keeps blockd from removing it.
    with daemons_for_test(tmp_path / "hanabi", extra_toml='rootfs = "block"\n') as started:
        yield started


def test_delete_returns_before_the_cleanup_and_a_crash_in_between_leaves_nothing(daemons, tmp_path):
    cid = "td1"
    bundle = make_bundle(tmp_path / "b", ["sh", "-c", "while true; do sleep 1; done"])
    daemons.runtime("create", "--bundle", str(bundle), cid, check=True)
    daemons.runtime("start", cid, check=True)
    sbs, run = daemons.config.sandboxes_dir, daemons.config.run_dir
    vm = json.loads((sbs / cid / "hypervisor.json").read_text())
    volume = json.loads((sbs / cid / "devices.json").read_text())["volumes"][0]["path"]
    # The root volume held as a host mount would hold it: blockd's release cannot finish.
    loop = subprocess.run(["losetup", "-f", "--show", "-r", volume], capture_output=True, text=True,
                          check=True).stdout.strip()
    record = run / "releasing" / "blockd" / f"{cid}.json"
    try:
        done = daemons.runtime("delete", "--force", cid)
        assert done.returncode == 0, done.stderr.decode()
        assert not is_same_process_alive(vm["pid"], vm["start_time"])  # killed before delete returned
        assert not (sbs / cid).exists()
        assert record.exists()  # accounted for, not yet removed
        # Its process still ran: agentd had the guest flush first, and the guest answered
        # (the sync request, not taken for a SYNC marker).
        assert "did not flush" not in (daemons.root / "agentd.log").read_text()
        for name in ("vmmd", "netd", "blockd"):
            daemons.stop(name, sig=signal.SIGKILL)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
    for name in ("vmmd", "netd", "blockd"):
        daemons.start(name)  # each finishes its queue before it serves
    assert not record.exists()
    assert leftovers(daemons, cid) == []
    assert "release not finished yet, will retry" in (daemons.root / "blockd.log").read_text()


def test_an_id_is_taken_again_right_after_its_delete(daemons, tmp_path):
    cid = "td2"
    bundle = make_bundle(tmp_path / "b", ["true"])
    for _ in range(2):
        daemons.runtime("create", "--bundle", str(bundle), cid, check=True)
        daemons.runtime("start", cid, check=True)
        daemons.runtime("delete", "--force", cid, check=True)  # the next create follows at once
    assert leftovers(daemons, cid) == []
