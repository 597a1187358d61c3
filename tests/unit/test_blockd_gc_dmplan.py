"""blockd's pure decisions: which bases to collect, and the devicemapper plans (no root)."""

from __future__ import annotations

import shutil

import pytest

from hanabi_blockd import dmplan
from hanabi_blockd.cow import backing_file, make_layer
from hanabi_blockd.detect import HostBlockFacts, choose_backend
from hanabi_blockd.gc import BaseUsage, choose_evictions

MIB = 1 << 20


def _bases():
    return [BaseUsage("old", 100 * MIB, last_used=1.0), BaseUsage("mid", 100 * MIB, last_used=2.0),
            BaseUsage("new", 100 * MIB, last_used=3.0)]


def test_gc_keeps_everything_within_budget():
    assert choose_evictions(_bases(), set(), budget_bytes=300 * MIB) == []


def test_gc_evicts_least_recently_used_first():
    assert choose_evictions(_bases(), set(), budget_bytes=250 * MIB) == ["old"]
    assert choose_evictions(_bases(), set(), budget_bytes=100 * MIB) == ["old", "mid"]
    assert choose_evictions(_bases(), set(), budget_bytes=0) == ["old", "mid", "new"]


def test_gc_never_evicts_a_base_in_use_even_over_budget():
    assert choose_evictions(_bases(), {"old"}, budget_bytes=250 * MIB) == ["mid"]
    assert choose_evictions(_bases(), {"old", "mid", "new"}, budget_bytes=0) == []


def test_gc_counts_the_base_about_to_be_built():
    assert choose_evictions(_bases(), set(), budget_bytes=300 * MIB, incoming_bytes=50 * MIB) == ["old"]


def test_backend_choice_takes_devicemapper_where_thin_pool_exists():
    thin = HostBlockFacts(device_mapper=True, thin_pool_target=True)
    assert choose_backend("auto", thin)[0] == "devicemapper"
    assert choose_backend("devicemapper", thin)[0] == "devicemapper"
    assert choose_backend("loopfile", thin)[0] == "loopfile"


def test_pool_table():
    table = dmplan.pool_table(10 << 30, "/dev/loop1", "/dev/loop0", 64)
    assert table == "0 20971520 thin-pool /dev/loop1 /dev/loop0 128 1638 1 skip_block_zeroing"
    # data rounded down to whole pool blocks
    assert dmplan.pool_table((1 << 20) + 5, "m", "d", 64).split()[1] == "2048"
    with pytest.raises(ValueError):
        dmplan.pool_table(10 << 30, "m", "d", 100)
    with pytest.raises(ValueError):
        dmplan.pool_table(1000, "m", "d", 64)


def test_thin_tables_names_and_messages():
    assert dmplan.thin_table(96 * MIB + 1, "/dev/mapper/hanabi-pool", 7) == "0 196609 thin /dev/mapper/hanabi-pool 7"
    assert dmplan.device_name("hanabi-pool", "snap", "c1") == "hanabi-pool-snap-c1"
    long = dmplan.device_name("hanabi-pool", "snap", "x" * 128)
    assert len(long) <= dmplan.MAX_DM_NAME and long != dmplan.device_name("hanabi-pool", "snap", "y" * 128)
    assert long.startswith("hanabi-pool-snap-")
    assert dmplan.message("create_thin", 3) == "create_thin 3"
    assert dmplan.message("create_snap", 4, 3) == "create_snap 4 3"
    assert dmplan.message("delete", 4) == "delete 4"
    for bad in (("create_snap", 4), ("delete", -1), ("drop", 1)):
        with pytest.raises(ValueError):
            dmplan.message(bad[0], *bad[1:])


def test_ids_are_allocated_as_pending_and_never_reused_while_taken():
    record = dmplan.PoolRecord(next_id=1, bases={"k": dmplan.ThinRecord(dev_id=1, size_bytes=1, name="b")})
    first, record = dmplan.allocate(record)
    second, record = dmplan.allocate(record)
    assert (first, second) == (2, 3) and record.pending == [2, 3] and record.next_id == 4


def test_cleanup_plan_after_a_crash():
    record = dmplan.PoolRecord(
        pending=[9],
        bases={"k": dmplan.ThinRecord(dev_id=1, size_bytes=1, name="p-base-k")},
        volumes={"live": dmplan.ThinRecord(dev_id=2, size_bytes=1, name="p-snap-live", base_key="k"),
                 "gone": dmplan.ThinRecord(dev_id=3, size_bytes=1, name="p-snap-gone", base_key="k")})
    active = ["p", "p-snap-live", "p-snap-gone", "p-base-k", "other-dev", "p2-snap-x", "hanabi-pool-snap-y"]
    plan = dmplan.cleanup_plan(record, active, {"live"}, "p")
    # a base left active by a crash mid-build goes; another pool's devices are not ours
    assert plan.remove_devices == ["p-base-k", "p-snap-gone"]
    assert plan.delete_ids == [3, 9]
    assert plan.forget_volumes == ["gone"]


def test_pool_status_parsing():
    ok = dmplan.parse_pool_status("0 20971520 thin-pool 3 120/524288 800/163840 - rw discard_passdown queue_if_no_space - 1024")
    assert (ok.used_data_blocks, ok.total_data_blocks, ok.used_meta_blocks, ok.healthy) == (800, 163840, 120, True)
    full = dmplan.parse_pool_status("0 2048 thin-pool 3 120/524288 16/16 - out_of_data_space discard_passdown queue_if_no_space -")
    assert not full.healthy and full.mode == "out_of_data_space"
    assert not dmplan.parse_pool_status("0 2048 thin-pool 3 1/2 1/2 - rw discard_passdown queue_if_no_space needs_check").healthy
    assert not dmplan.parse_pool_status("0 2048 thin-pool Fail - - - -").healthy
    with pytest.raises(ValueError):
        dmplan.parse_pool_status("0 2048 linear 7:0 0")


def test_loop_files_plan():
    assert dmplan.loop_files("/var/lib/hanabi/devicemapper", 100, 2048) == [
        ("/var/lib/hanabi/devicemapper/data", 100 << 30), ("/var/lib/hanabi/devicemapper/metadata", 2048 << 20)]


@pytest.mark.skipif(not shutil.which("qemu-img"), reason="qemu-img is not installed (apt-get install qemu-utils)")
def test_qcow2_layer_names_its_base_and_stays_small(tmp_path):
    base = tmp_path / "base.raw"
    with open(base, "wb") as handle:
        handle.truncate(64 * MIB)
    make_layer(base, tmp_path / "c.qcow2", 64 * MIB, "qcow2")
    assert backing_file(tmp_path / "c.qcow2") == str(base)
    assert (tmp_path / "c.qcow2").stat().st_blocks * 512 < MIB
    make_layer(base, tmp_path / "c.raw", 64 * MIB, "raw")
    assert backing_file(tmp_path / "c.raw") is None and (tmp_path / "c.raw").stat().st_size == 64 * MIB
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.raw", "c.qcow2", "c.raw"]


def test_layer_over_a_vanished_base_fails_cleanly(tmp_path):
    from hanabi_common.errors import FailedPrecondition
    with pytest.raises(FailedPrecondition, match="vanished"):
        make_layer(tmp_path / "gone.raw", tmp_path / "c.qcow2", MIB, "qcow2")
    assert list(tmp_path.iterdir()) == []
