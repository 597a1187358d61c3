"""blockd alone, for real (root, mke2fs, qemu-img, overlayfs, loop devices): image reuse,
identity of overlay rootfs, collection, restart, bad input. No VM is booted here; the
tests with VMs are in test_blockd_vms.py."""

from __future__ import annotations

import os
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from hanabi_blockd.client import BlockdClient
from hanabi_blockd.cow import backing_file
from hanabi_common.errors import FailedPrecondition, InvalidArgument
from tests.helpers.hanabi import Daemons, drain

pytestmark = pytest.mark.integration
MIB = 1 << 20


def _need_root():
    if os.geteuid() != 0:
        pytest.skip("needs root (overlay mounts, loop devices)")
    for tool in ("mke2fs", "qemu-img", "debugfs", "losetup"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed")


def start_blockd(root: Path, extra: str = "", volume_dir: Path | None = None) -> Daemons:
    """A blockd of its own under `root` (volumes in `volume_dir`, default root/volumes)."""
    root.mkdir(parents=True, exist_ok=True)
    config = root / "hanabi.toml"
    volume_dir = volume_dir or root / "volumes"
    config.write_text(f'run_dir = "{root}/run"\nlog_level = "debug"\n[block]\n'
                      f'volume_dir = "{volume_dir}"\n{extra}')
    daemons = Daemons(root=root, config_path=config)
    daemons.start("blockd")
    return daemons


@pytest.fixture
def blockd(tmp_path):
    _need_root()
    daemons = start_blockd(tmp_path / "hanabi")
    yield daemons
    daemons.stop_all()


def client(daemons: Daemons) -> BlockdClient:
    return BlockdClient(daemons.config, timeout=120)


def sandbox(daemons: Daemons, sid: str) -> str:
    """Make the sandbox directory the runtime would have reserved."""
    (daemons.config.sandboxes_dir / sid).mkdir(parents=True, exist_ok=True)
    return sid


def make_image(path: Path, mib: int, marker: str = "image") -> Path:
    """A rootfs directory with `mib` MiB of random data and a small marker file."""
    (path / "etc").mkdir(parents=True)
    (path / "etc" / "marker").write_text(marker + "\n")
    with open(path / "big", "wb") as handle:
        for _ in range(mib):
            handle.write(os.urandom(MIB))
    return path


def debugfs_cat(image: str, inner: str) -> bytes:
    return subprocess.run(["debugfs", "-R", f"cat {inner}", image], capture_output=True, check=True).stdout


def ext4_on_loop(tmp_path: Path, text: str) -> tuple[str, Path]:
    """A 32 MiB ext4 image holding a file `f` with `text`, on a fresh loop device; and an
    empty directory to mount it on. The caller detaches the loop device."""
    image = tmp_path / "disk.ext4"
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "f").write_text(text)
    with open(image, "wb") as handle:
        handle.truncate(32 * MIB)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tmp_path / "tree"), str(image)], check=True)
    loop = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True,
                          check=True).stdout.strip()
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    return loop, rootfs


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def files_under(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def test_second_container_of_a_200mb_image_copies_nothing(blockd, tmp_path):
    image = make_image(tmp_path / "img", 200)
    c = client(blockd)
    first = c.provision(sandbox(blockd, "s1"), str(image))
    second = c.provision(sandbox(blockd, "s2"), str(image))
    assert (first.layout, first.format, second.layout) == ("layer", "qcow2", "layer")
    assert "base built" in first.detail and "base reused" in second.detail
    # One base, the same file (same inode) for both, holding the 200 MB once.
    assert first.base_key == second.base_key and first.base_path == second.base_path
    base = os.stat(first.base_path)
    assert base.st_ino == os.stat(second.base_path).st_ino and base.st_nlink == 1
    assert allocated(first.base_path) >= 200 * MIB
    assert oct(base.st_mode & 0o777) == "0o444"
    # Each container's own layer: a qcow2 naming the base, well under a MiB on disk.
    for volume in (first, second):
        assert backing_file(Path(volume.path)) == first.base_path
        assert allocated(volume.path) < 1 * MIB, allocated(volume.path)
    assert debugfs_cat(first.base_path, "/etc/marker") == b"image\n"
    listing = c.listing()
    assert [b.holders for b in listing.bases] == [["s1", "s2"]]
    assert {v.sandbox_id for v in listing.volumes} == {"s1", "s2"}
    assert listing.pools[0].healthy and listing.pools[0].bases_bytes >= 200 * MIB
    ctl = subprocess.run([str(Path(os.sys.executable).parent / "hanabi-blockd"), "ctl", "--config",
                          str(blockd.config_path), "list"], capture_output=True, text=True, timeout=30)
    assert ctl.returncode == 0, ctl.stderr
    assert first.base_key in ctl.stdout and "s1,s2" in ctl.stdout and "POOL" in ctl.stdout

    assert c.release("s1").existed and c.release("s2").existed
    assert drain(blockd)["blockd"] == []  # the files go in the background
    volume_dir = blockd.config.block.volume_dir
    assert not Path(first.path).exists() and not Path(second.path).exists()
    assert [b.holders for b in c.listing().bases] == [[]]  # kept for the next container
    assert c.collect(budget_mib=0).removed == [first.base_key]
    assert files_under(volume_dir) == []


def test_raw_copy_for_firecracker_is_a_sparse_copy_of_the_base(blockd, tmp_path):
    image = make_image(tmp_path / "img", 10)
    c = client(blockd)
    qcow = c.provision(sandbox(blockd, "q"), str(image))
    raw = c.provision(sandbox(blockd, "r"), str(image), formats=["raw"])
    assert (raw.layout, raw.format, raw.base_key) == ("copy", "raw", qcow.base_key)
    assert os.path.getsize(raw.path) == raw.size_bytes
    assert debugfs_cat(raw.path, "/etc/marker") == b"image\n"
    # Sparse: the copy occupies about what the base does, not its apparent size.
    assert allocated(raw.path) <= allocated(raw.base_path) + MIB < raw.size_bytes
    c.release("q"), c.release("r")
    assert drain(blockd)["blockd"] == []
    assert not Path(raw.path).exists()


def _overlay(tmp_path: Path, name: str, layers: list[Path], upper_file: str | None = None) -> Path:
    """A Docker-shaped overlay2 rootfs: an init layer of its own over shared image layers."""
    init = tmp_path / f"{name}-init" / "diff"
    (init / "etc").mkdir(parents=True)
    for skeleton in ("etc/hosts", "etc/hostname", "etc/resolv.conf", ".dockerenv"):
        (init / skeleton).touch()
    upper, work, merged = (tmp_path / name / d for d in ("diff", "work", "merged"))
    for d in (upper, work, merged):
        d.mkdir(parents=True)
    if upper_file:
        (upper / upper_file).write_text("copied in before start\n")
    lower = ":".join(str(p) for p in [init, *layers])
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lower},upperdir={upper},workdir={work}", str(merged)], check=True)
    return merged


def test_overlay2_rootfs_is_keyed_by_its_layers_not_its_init_layer(blockd, tmp_path):
    layers = [make_image(tmp_path / "layer2", 1, "top"), make_image(tmp_path / "layer1", 1, "bottom")]
    merged = [_overlay(tmp_path, "c1", layers), _overlay(tmp_path, "c2", layers),
              _overlay(tmp_path, "c3", layers, upper_file="docker-cp-file")]
    c = client(blockd)
    try:
        v1, v2, v3 = (c.provision(sandbox(blockd, f"o{i}"), str(m)) for i, m in enumerate(merged, 1))
        assert v1.base_key.startswith("ovl-") and v1.base_key == v2.base_key
        assert "overlay-layers: 2 layers, init layer" in v1.detail and "base reused" in v2.detail
        # An upper layer with changes: keyed by content, and the base has the change in it.
        assert v3.base_key.startswith("cnt-") and "upper layer" in v3.detail
        assert debugfs_cat(v3.base_path, "/docker-cp-file") == b"copied in before start\n"
        assert debugfs_cat(v1.base_path, "/etc/marker") == b"top\n"
        assert debugfs_cat(v1.base_path, "/.dockerenv") == b""
    finally:
        for m in merged:
            subprocess.run(["umount", str(m)], check=False)
    for sid in ("o1", "o2", "o3"):
        c.release(sid)


def test_collection_takes_least_recently_used_unheld_bases(blockd, tmp_path):
    c = client(blockd)
    images = [make_image(tmp_path / f"img{i}", 2, f"m{i}") for i in range(3)]
    volumes = [c.provision(sandbox(blockd, f"g{i}"), str(p)) for i, p in enumerate(images)]
    c.release("g0"), c.release("g2")
    assert drain(blockd)["blockd"] == []  # a layer still being removed holds its base
    c.provision(sandbox(blockd, "g0b"), str(images[0]))  # g0's base: used again, now the newest
    c.release("g0b")
    assert drain(blockd)["blockd"] == []
    keys = [v.base_key for v in volumes]
    assert len(set(keys)) == 3
    one_base = max(b.allocated_bytes for b in c.listing().bases)
    removed = c.collect(budget_mib=(2 * one_base + MIB) >> 20).removed
    assert removed == [keys[2]]  # g2's: unheld and the least recently used
    assert c.collect(budget_mib=0).removed == [keys[0]]  # g1's is held by g1
    assert [b.key for b in c.listing().bases] == [keys[1]]
    c.release("g1")


def test_restart_finds_volumes_back_and_cleans_crash_leftovers(blockd, tmp_path):
    c = client(blockd)
    image = make_image(tmp_path / "img", 5)
    kept = c.provision(sandbox(blockd, "alive"), str(image))
    volume_dir = blockd.config.block.volume_dir
    # What a crash mid-provisioning leaves: half-built files, a layer no devices.json claims.
    (volume_dir / "bases" / "cnt-halfbuilt.raw.partial").write_bytes(b"x" * 4096)
    (volume_dir / "crashed.qcow2.partial").write_bytes(b"x")
    (volume_dir / "crashed.qcow2").write_bytes(b"x")
    (volume_dir / "bases" / "cnt-orphan.raw").write_bytes(b"x")
    blockd.stop("blockd", signal.SIGKILL)
    blockd.start("blockd")
    c = client(blockd)
    assert [v.path for v in c.list().volumes] == [kept.path]
    assert [b.holders for b in c.listing().bases] == [["alive"]]
    assert files_under(volume_dir) == sorted([f"bases/{kept.base_key}.json", f"bases/{kept.base_key}.raw",
                                              Path(kept.path).name])
    c.release("alive")


def test_bad_input_is_refused_and_leaves_nothing(blockd, tmp_path):
    c = client(blockd)
    (tmp_path / "file").write_text("not a dir")
    with pytest.raises(InvalidArgument, match="is not a directory"):
        c.provision(sandbox(blockd, "b1"), str(tmp_path / "file"))
    with pytest.raises(InvalidArgument, match="does not exist"):
        c.provision(sandbox(blockd, "b2"), str(tmp_path / "nope"))
    assert c.list().volumes == [] and files_under(blockd.config.block.volume_dir) == []


def test_a_vanished_base_is_rebuilt(blockd, tmp_path):
    c = client(blockd)
    image = make_image(tmp_path / "img", 3)
    first = c.provision(sandbox(blockd, "v1"), str(image))
    os.unlink(first.base_path)  # someone removed it under blockd's feet
    second = c.provision(sandbox(blockd, "v2"), str(image))
    # (not the inode number: ext4 may give the new file the freed one)
    assert "base built" in second.detail and second.base_path == first.base_path
    assert os.path.exists(second.base_path)
    assert debugfs_cat(second.path if second.format == "raw" else second.base_path, "/etc/marker") == b"image\n"
    assert c.release("v1").existed and c.release("v2").existed


def test_a_volume_still_attached_at_delete_is_kept_until_detached(blockd, tmp_path):
    c = client(blockd)
    volume = c.provision(sandbox(blockd, "busy"), str(make_image(tmp_path / "img", 1)), formats=["raw"])
    loop = subprocess.run(["losetup", "--find", "--show", "--read-only", volume.path],
                          capture_output=True, text=True, check=True).stdout.strip()
    try:
        assert c.release("busy").existed  # recorded as to be released: delete does not wait
        assert drain(blockd, timeout=1.0)["blockd"] == ["busy"]  # retried, still attached
        assert Path(volume.path).exists()  # nothing half-removed
        log = (blockd.root / "blockd.log").read_text()
        assert "release not finished yet" in log and f"still attached to {loop}" in log
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
    assert drain(blockd)["blockd"] == [] and not Path(volume.path).exists()
    assert not c.release("busy").existed


def test_a_full_disk_fails_cleanly(tmp_path):
    _need_root()
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(small)], check=True)
    try:
        daemons = start_blockd(tmp_path / "hanabi", volume_dir=small)
        try:
            c = client(daemons)
            with pytest.raises(FailedPrecondition, match="space"):
                c.provision(sandbox(daemons, "full"), str(make_image(tmp_path / "img", 60)))
            assert c.list().volumes == [] and files_under(small) == []
            ok = c.provision(sandbox(daemons, "fits"), str(make_image(tmp_path / "img2", 2)))
            assert c.release("fits").existed
            assert drain(daemons)["blockd"] == [] and not Path(ok.path).exists()
        finally:
            daemons.stop_all()
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_killed_mid_build_leaves_nothing_a_restart_does_not_clean(blockd, tmp_path):
    import threading
    image = make_image(tmp_path / "img", 200)
    volume_dir = blockd.config.block.volume_dir
    errors: list[Exception] = []

    def provision():
        try:
            # a short deadline: the daemon dies under the call, nothing will answer it
            BlockdClient(blockd.config, timeout=10).provision(sandbox(blockd, "crash"), str(image))
        except Exception as exc:
            errors.append(exc)

    worker = threading.Thread(target=provision)
    worker.start()
    deadline = time.monotonic() + 60
    while not list((volume_dir / "bases").glob("*.partial")):
        assert time.monotonic() < deadline and worker.is_alive(), "no partial base seen"
        time.sleep(0.01)
    blockd.stop("blockd", signal.SIGKILL)
    worker.join(30)
    assert not worker.is_alive()
    assert errors
    assert list((volume_dir / "bases").glob("*.partial"))  # the crash really left one
    blockd.start("blockd")
    assert files_under(volume_dir) == [] and client(blockd).list().volumes == []
    volume = client(blockd).provision("crash", str(image))  # and the next try works
    assert "base built" in volume.detail and debugfs_cat(volume.base_path, "/etc/marker") == b"image\n"
    client(blockd).release("crash")


def test_passthrough_taken_then_crash_gives_the_device_back_at_restart(blockd, tmp_path):
    loop, rootfs = ext4_on_loop(tmp_path, "on the device\n")
    try:
        subprocess.run(["mount", loop, str(rootfs)], check=True)
        volume = client(blockd).provision(sandbox(blockd, "pt"), str(rootfs))
        assert (volume.layout, volume.path, volume.fstype) == ("passthrough", loop, "ext4")
        assert not (rootfs / "f").exists()  # taken from the host: only the VM may mount it now
        # A crash between taking the device and recording the volume: the intent record says so.
        state_file = blockd.config.sandboxes_dir / "pt" / "devices.json"
        state = json.loads(state_file.read_text())
        state_file.write_text(json.dumps(dict(state, complete=False)))
        blockd.stop("blockd", signal.SIGKILL)
        blockd.start("blockd")
        assert (rootfs / "f").read_text() == "on the device\n"  # given back
        assert client(blockd).list().volumes == [] and not state_file.exists()
    finally:
        subprocess.run(["umount", str(rootfs)], check=False)
        subprocess.run(["losetup", "-d", loop], check=True)


def test_passthrough_refused_for_a_device_mounted_twice_falls_back_to_a_copy(blockd, tmp_path):
    loop, rootfs = ext4_on_loop(tmp_path, "copied\n")
    other = tmp_path / "other"
    other.mkdir()
    try:
        subprocess.run(["mount", loop, str(rootfs)], check=True)
        subprocess.run(["mount", loop, str(other)], check=True)
        volume = client(blockd).provision(sandbox(blockd, "twice"), str(rootfs))
        assert volume.layout == "layer" and (rootfs / "f").exists()  # left mounted on the host
        assert debugfs_cat(volume.base_path, "/f") == b"copied\n"
        client(blockd).release("twice")
    finally:
        for m in (rootfs, other):
            subprocess.run(["umount", str(m)], check=False)
        subprocess.run(["losetup", "-d", loop], check=True)


def test_concurrent_provisionings_of_one_image_build_one_base(blockd, tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    image = make_image(tmp_path / "img", 50)
    sids = [sandbox(blockd, f"p{i}") for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        volumes = list(pool.map(lambda sid: client(blockd).provision(sid, str(image)), sids))
    assert len({v.base_key for v in volumes}) == 1
    assert sorted("base built" in v.detail for v in volumes) == [False, False, False, True]
    assert len(list((blockd.config.block.volume_dir / "bases").glob("*.raw"))) == 1
    # a collection now cannot take the base: every sandbox holds it
    assert client(blockd).collect(budget_mib=0).removed == []
    for sid in sids:
        client(blockd).release(sid)


def _holds_open(pid: int, path: str) -> bool:
    """Whether process `pid` has `path` open (one of its /proc fds links to it)."""
    try:
        return any(os.readlink(fd) == path for fd in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False


def test_a_passthrough_device_still_held_at_delete_is_not_mounted_back_yet(blockd, tmp_path):
    loop, rootfs = ext4_on_loop(tmp_path, "mine\n")
    holder = None
    try:
        subprocess.run(["mount", loop, str(rootfs)], check=True)
        assert client(blockd).provision(sandbox(blockd, "held"), str(rootfs)).layout == "passthrough"
        # Something (a VM that did not stop) still has the device open.
        holder = subprocess.Popen(["sh", "-c", f"exec 3<{loop}; exec sleep 60"])
        deadline = time.monotonic() + 10
        while not _holds_open(holder.pid, loop):
            assert time.monotonic() < deadline, f"pid {holder.pid} never opened {loop}"
            time.sleep(0.01)
        assert client(blockd).release("held").existed  # recorded: the worker retries
        assert drain(blockd, timeout=1.0)["blockd"] == ["held"]
        assert not (rootfs / "f").exists()  # nothing half-done
        assert f"still held open by pid {holder.pid}" in (blockd.root / "blockd.log").read_text()
        holder.kill()
        holder.wait()
        assert drain(blockd)["blockd"] == []
        assert (rootfs / "f").read_text() == "mine\n"
    finally:
        if holder is not None and holder.poll() is None:
            holder.kill()
        subprocess.run(["umount", str(rootfs)], check=False)
        subprocess.run(["losetup", "-d", loop], check=True)
