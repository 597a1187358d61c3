"""The devicemapper backend's command sequence against a stand-in `dmsetup` (no root).

This host has no device-mapper, so the real backend runs only in
tests/integration/test_blockd_devicemapper.py where thin-pool exists. Here a small stand-in
records the tables and pool messages it is given and makes device nodes as plain files, so
the ordering of thin ids, pending records, names and clean-up is checked everywhere; mke2fs
is the real one, writing into those files.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from hanabi_blockd import devicemapper
from hanabi_blockd.devicemapper import DeviceMapperVolumes
from hanabi_blockd.identity import Identity
from hanabi_blockd.loopfile import LoopFileBackend
from hanabi_common.config import BlockConfig
from hanabi_common.errors import FailedPrecondition, Internal

FAKE_DMSETUP = f"""#!{sys.executable}
import json, os, sys
state_path, mapper = os.environ["FAKE_DM"], os.environ["FAKE_MAPPER"]
s = json.load(open(state_path)) if os.path.exists(state_path) else {{"devs": {{}}, "msgs": []}}
a = sys.argv[1:]
if a[0] == "create":
    if a[1] in s["devs"]:
        sys.exit("device exists")
    s["devs"][a[1]] = a[3]
    with open(os.path.join(mapper, a[1]), "wb") as f:
        f.truncate(int(a[3].split()[1]) * 512)
elif a[0] == "remove":
    if a[1] not in s["devs"]:
        sys.exit("no such device")
    del s["devs"][a[1]]
    os.unlink(os.path.join(mapper, a[1]))
elif a[0] == "message":
    if a[3] in os.environ.get("FAKE_DM_REFUSE", "").split(","):
        sys.exit("message refused")
    s["msgs"].append(a[3])
elif a[0] == "status":
    print(os.environ.get("FAKE_DM_STATUS", "0 2097152 thin-pool 1 10/4096 100/16384 - rw discard_passdown queue_if_no_space -"))
elif a[0] == "ls":
    for name in s["devs"]:
        print(name + "\\t(253:0)")
json.dump(s, open(state_path, "w"))
"""
FAKE_BLOCKDEV = f"""#!{sys.executable}
import os, sys
print(os.path.getsize(sys.argv[-1]))
"""


@pytest.fixture
def dm(tmp_path, monkeypatch):
    if not shutil.which("mke2fs"):
        pytest.skip("mke2fs is not installed")
    bin_dir, mapper = tmp_path / "bin", tmp_path / "mapper"
    bin_dir.mkdir(), mapper.mkdir()
    for name, text in (("dmsetup", FAKE_DMSETUP), ("blockdev", FAKE_BLOCKDEV)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path(sys.executable).parent}:/usr/sbin:/usr/bin:/sbin:/bin")
    monkeypatch.setenv("FAKE_DM", str(tmp_path / "dm.json"))
    monkeypatch.setenv("FAKE_MAPPER", str(mapper))
    monkeypatch.setattr(devicemapper, "MAPPER_DIR", mapper)
    for name in ("data", "meta"):
        with open(tmp_path / name, "wb") as handle:
            handle.truncate(1 << 30 if name == "data" else 16 << 20)
    config = BlockConfig(dm_pool_name="tp", dm_dir=tmp_path / "dm", dm_data_device=tmp_path / "data",
                         dm_metadata_device=tmp_path / "meta", volume_dir=tmp_path / "volumes")
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "marker").write_text("x\n")
    volumes = DeviceMapperVolumes(config, LoopFileBackend(config.volume_dir, 8, 1024))
    return volumes, rootfs, tmp_path


def _fake(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "dm.json").read_text())


IDENT = Identity(key="cnt-img", kind="content", detail="test")


def test_pool_then_one_base_and_a_snapshot_per_container(dm):
    volumes, rootfs, tmp = dm
    assert _fake(tmp)["devs"]["tp"].startswith("0 2097152 thin-pool ")
    a = volumes.root_volume("a", rootfs, IDENT, ["qcow2"], lambda: [])
    b = volumes.root_volume("b", rootfs, IDENT, ["qcow2"], lambda: [])
    assert (a.format, a.layout, a.path) == ("raw", "layer", str(tmp / "mapper" / "tp-snap-a"))
    assert "base built" in a.detail and "base reused" in b.detail
    fake = _fake(tmp)
    assert fake["msgs"] == ["create_thin 1", "create_snap 2 1", "create_snap 3 1"]
    assert sorted(fake["devs"]) == ["tp", "tp-snap-a", "tp-snap-b"]  # the base is left inactive
    assert fake["devs"]["tp-snap-a"] == f"0 {a.size_bytes // 512} thin {tmp / 'mapper' / 'tp'} 2"
    assert [m.key for m in volumes.bases()] == ["cnt-img"]
    assert volumes.pools(0)[0].healthy

    assert volumes.remove_volume(a) and not volumes.remove_volume(a)
    assert volumes.remove_base("cnt-img", unless=lambda: True) is False
    volumes.remove_volume(b)
    assert volumes.remove_base("cnt-img")
    fake = _fake(tmp)
    assert fake["msgs"][3:] == ["delete 2", "delete 3", "delete 1"] and sorted(fake["devs"]) == ["tp"]
    record = json.loads((tmp / "dm" / "pool.json").read_text())
    assert (record["bases"], record["volumes"], record["pending"]) == ({}, {}, [])


def test_a_failed_base_build_deletes_its_thin_id_at_once(dm, monkeypatch):
    volumes, rootfs, tmp = dm
    monkeypatch.setattr(volumes.files, "_mkfs", lambda *a: (_ for _ in ()).throw(Internal("mke2fs failed")))
    with pytest.raises(Internal):
        volumes.root_volume("a", rootfs, IDENT, ["raw"], lambda: [])
    fake = _fake(tmp)
    assert fake["msgs"] == ["create_thin 1", "delete 1"] and sorted(fake["devs"]) == ["tp"]
    assert json.loads((tmp / "dm" / "pool.json").read_text())["pending"] == []


def test_an_id_the_kernel_would_not_delete_stays_pending_for_the_restart(dm, monkeypatch):
    volumes, rootfs, tmp = dm
    monkeypatch.setattr(volumes.files, "_mkfs", lambda *a: (_ for _ in ()).throw(Internal("mke2fs failed")))
    monkeypatch.setenv("FAKE_DM_REFUSE", "delete 1")
    with pytest.raises(Internal):
        volumes.root_volume("a", rootfs, IDENT, ["raw"], lambda: [])
    assert json.loads((tmp / "dm" / "pool.json").read_text())["pending"] == [1]
    monkeypatch.delenv("FAKE_DM_REFUSE")
    volumes.recover(claimed=set())
    assert _fake(tmp)["msgs"][-1] == "delete 1"
    assert json.loads((tmp / "dm" / "pool.json").read_text())["pending"] == []


def test_restart_removes_unclaimed_snapshots_and_leaves_other_devices(dm):
    volumes, rootfs, tmp = dm
    kept = volumes.root_volume("kept", rootfs, IDENT, ["raw"], lambda: [])
    volumes.root_volume("lost", rootfs, IDENT, ["raw"], lambda: [])
    state = _fake(tmp)
    state["devs"]["other-pool-snap-x"] = "0 8 thin /dev/mapper/other-pool 1"
    (tmp / "dm.json").write_text(json.dumps(state))
    (tmp / "mapper" / "other-pool-snap-x").touch()
    volumes.recover(claimed={Path(kept.path)})
    fake = _fake(tmp)
    assert sorted(fake["devs"]) == ["other-pool-snap-x", "tp", "tp-snap-kept"]
    assert fake["msgs"][-1] == "delete 3"
    assert list(json.loads((tmp / "dm" / "pool.json").read_text())["volumes"]) == ["kept"]


def test_a_full_or_failed_pool_is_refused_before_anything_is_made(dm, monkeypatch):
    volumes, rootfs, tmp = dm
    monkeypatch.setenv("FAKE_DM_STATUS",
                       "0 2097152 thin-pool 1 10/4096 16384/16384 - out_of_data_space discard_passdown queue_if_no_space -")
    with pytest.raises(FailedPrecondition, match="not usable: mode out_of_data_space"):
        volumes.root_volume("a", rootfs, IDENT, ["raw"], lambda: [])
    monkeypatch.setenv("FAKE_DM_STATUS", "0 2097152 thin-pool 1 10/4096 16380/16384 - rw discard_passdown queue_if_no_space -")
    with pytest.raises(FailedPrecondition, match="is full"):
        volumes.root_volume("a", rootfs, IDENT, ["raw"], lambda: [])
    assert _fake(tmp)["msgs"] == [] and sorted(_fake(tmp)["devs"]) == ["tp"]
