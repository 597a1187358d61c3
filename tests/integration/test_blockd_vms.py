"""blockd with real VMs through hanabi-runtime: with `[block] rootfs = "block"`, two
containers of one 200 MB image share its base and not their writes; with the default
(shared rootfs), a loop device mounted at the bundle rootfs still passes through.
Each VM boot costs seconds under TCG: three boots in all."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from hanabi_blockd.client import BlockdClient
from hanabi_blockd.cow import backing_file
from hanabi_runtime.demo_bundle import make_bundle, make_rootfs
from tests.helpers.hanabi import BIN, daemons_for_test, drain, leftovers

pytestmark = pytest.mark.integration
MIB = 1 << 20


def _create(hanabi, cid: str, bundle: Path, out: Path) -> None:
    with open(out, "wb") as stdout, open(out.with_suffix(".err"), "wb") as stderr:
        done = subprocess.run([str(BIN / "hanabi-runtime"), "--config", str(hanabi.config_path),
                               "create", "--bundle", str(bundle), "--pid-file", str(out.with_suffix(".pid")), cid],
                              stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, timeout=180)
    assert done.returncode == 0, out.with_suffix(".err").read_text()


def _start_and_wait(hanabi, cid: str, out: Path, timeout: float = 120) -> None:
    """Start `cid`; return once it stopped and its stand-in (which writes `out`) has exited."""
    standin = int(out.with_suffix(".pid").read_text())
    hanabi.runtime("start", cid, check=True)
    deadline = time.monotonic() + timeout
    while hanabi.state(cid)["status"] != "stopped" or Path(f"/proc/{standin}").exists():
        assert time.monotonic() < deadline, f"{cid} did not stop (or its stand-in {standin} did not exit)"
        time.sleep(0.1)


def _bundle(path: Path, args: list[str], rootfs: Path | None = None) -> Path:
    """A busybox bundle; with `rootfs`, its config points at that shared directory."""
    make_bundle(path, args)
    if rootfs is None:
        return path
    config = json.loads((path / "config.json").read_text())
    config["root"]["path"] = str(rootfs)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def block_hanabi(tmp_path_factory):
    """The four daemons with root filesystems as copy-on-write block layers."""
    with daemons_for_test(tmp_path_factory.mktemp("hanabi-block"), extra_toml='rootfs = "block"\n') as daemons:
        yield daemons


def test_two_containers_share_a_200mb_base_but_not_their_writes(block_hanabi, tmp_path, cid):
    hanabi = block_hanabi
    first = _bundle(tmp_path / "b1", ["sh", "-c", "echo from-c1 > /c1-was-here && sync && cat /c1-was-here"])
    rootfs = first / "rootfs"
    with open(rootfs / "big", "wb") as handle:
        for _ in range(200):
            handle.write(os.urandom(MIB))
    tail = hashlib.md5((rootfs / "big").read_bytes()[199 * MIB:]).hexdigest()
    second = _bundle(tmp_path / "b2", ["sh", "-c", "if [ -e /c1-was-here ]; then echo seen; else echo unseen; fi; "
                                       "dd if=/big bs=1M skip=199 2>/dev/null | md5sum"], rootfs=rootfs)
    c1, c2 = f"{cid}-1", f"{cid}-2"
    blockd = BlockdClient(hanabi.config)
    try:
        _create(hanabi, c1, first, tmp_path / "c1.out")
        _create(hanabi, c2, second, tmp_path / "c2.out")
        volumes = {v.sandbox_id: v for v in blockd.list().volumes if v.serial == "hanabi-root"}
        v1, v2 = volumes[c1], volumes[c2]
        assert v1.base_key == v2.base_key and "base reused" in v2.detail
        assert os.stat(v1.base_path).st_ino == os.stat(v2.base_path).st_ino
        assert os.stat(v1.base_path).st_blocks * 512 >= 200 * MIB
        for volume in (v1, v2):
            assert volume.format == "qcow2" and backing_file(Path(volume.path)) == v1.base_path
            assert os.stat(volume.path).st_blocks * 512 < MIB  # booted, mounted, still tiny

        _start_and_wait(hanabi, c1, tmp_path / "c1.out")
        assert (tmp_path / "c1.out").read_text() == "from-c1\n"
        _start_and_wait(hanabi, c2, tmp_path / "c2.out")
        assert (tmp_path / "c2.out").read_text().split() == ["unseen", tail, "-"]
    finally:
        for c in (c1, c2):
            hanabi.runtime("delete", "--force", c)
    for c in (c1, c2):
        assert leftovers(hanabi, c) == []
    assert not Path(v1.path).exists() and not Path(v2.path).exists()
    base = next(b for b in blockd.listing().bases if b.key == v1.base_key)
    assert base.holders == []  # kept for reuse until the budget needs the room
    assert v1.base_key in blockd.collect(budget_mib=0).removed
    assert not Path(v1.base_path).exists()


def _mounted(path: Path) -> str | None:
    done = subprocess.run(["findmnt", "-n", "-o", "SOURCE", "--mountpoint", str(path)], capture_output=True, text=True)
    return done.stdout.strip() or None


@pytest.mark.parametrize("how", ["exits", "delete-force", "paused-delete-force"])
def test_a_loop_device_mounted_at_the_rootfs_passes_through(hanabi, tmp_path, cid, how):
    """The device is the VM's root disk and given back with the guest's writes on it: of a
    process that exited (the guest flushes before it reports the exit), and of one still
    running at `delete --force` (agentd has the guest flush before vmmd kills the VM; a
    paused VM is thawed for it first), as under runc, where the writes are in the host's
    page cache."""
    tree = tmp_path / "tree"
    make_rootfs(tree)
    (tree / "hello-from-loop").write_text("loop says hi\n")
    image = tmp_path / "disk.ext4"
    with open(image, "wb") as handle:
        handle.truncate(64 * MIB)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), str(image)], check=True)
    loop = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True,
                          check=True).stdout.strip()
    script = "cat /hello-from-loop; echo from-guest > /written"
    # The running one says it wrote through a bind mount (a live share): no exec, whose
    # exit would make the guest flush.
    bundle = make_bundle(tmp_path / "bundle", ["sh", "-c", script if how == "exits" else script + "; touch /m/wrote; exec sleep 600"])
    marks = tmp_path / "marks"
    marks.mkdir()
    config = json.loads((bundle / "config.json").read_text())
    config["mounts"].append({"destination": "/m", "type": "bind", "source": str(marks), "options": ["rbind"]})
    (bundle / "config.json").write_text(json.dumps(config))
    rootfs = bundle / "rootfs"
    try:
        subprocess.run(["mount", str(loop), str(rootfs)], check=True)
        if how == "exits":
            done = hanabi.runtime("run", "--bundle", str(bundle), cid)
            assert done.returncode == 0, done.stderr.decode()
            assert done.stdout == b"loop says hi\n"
        else:
            hanabi.runtime("run", "-d", "--bundle", str(bundle), cid, check=True)
            deadline = time.monotonic() + 60
            while not (marks / "wrote").exists():
                assert time.monotonic() < deadline, "the container never wrote /written"
                time.sleep(0.05)
            if how == "paused-delete-force":  # docker rm -f of a paused container
                hanabi.runtime("pause", cid, check=True)
            hanabi.runtime("delete", "--force", cid, check=True)
            # The guest answered the flush (a write-back within its 5 s bound would hide a
            # request it never answers, as one named like the SYNC marker's pseudo-message).
            assert "did not flush" not in (hanabi.root / "agentd.log").read_text()
        # Given back (by blockd's release, after `delete` returned: drained here): mounted
        # again where it was, with the guest's write on it.
        assert drain(hanabi)["blockd"] == []
        assert _mounted(rootfs) == loop
        assert (rootfs / "written").read_text() == "from-guest\n"
        assert leftovers(hanabi, cid) == []
        assert not list(hanabi.config.block.volume_dir.glob(f"{cid}*"))
    finally:
        subprocess.run(["umount", str(rootfs)], check=False)
        subprocess.run(["losetup", "-d", loop], check=True)
    # A busy loop device is only marked for detach (autoclear): wait until its last opener
    # (udev probing after the umount, on a loaded host) let go.
    deadline = time.monotonic() + 15
    while loop in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout.split(":"):
        assert time.monotonic() < deadline, f"{loop} is still attached"
        time.sleep(0.1)
