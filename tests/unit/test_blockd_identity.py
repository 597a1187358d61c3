"""blockd's pure reading of mountinfo: image identity of overlay rootfs, content keys, and
the passthrough decision (no root needed)."""

from __future__ import annotations

import os

import pytest

from hanabi_blockd import passthrough
from hanabi_blockd.identity import content_key, listing, overlay_key, overlay_layers
from hanabi_blockd.mountinfo import mount_at, mounts_of_device, parse_mountinfo, unescape

D = "/var/lib/docker/overlay2"
OVERLAY = (f"1234 28 0:123 / {D}/c1/merged rw,relatime shared:600 - overlay overlay "
           f"rw,lowerdir={D}/l/INIT1:{D}/l/L1:{D}/l/L2,upperdir={D}/c1/diff,workdir={D}/c1/work")
RELATIVE = (f"1235 28 0:124 / {D}/c2/merged rw,relatime - overlay overlay "
            f"rw,lowerdir=l/INIT2:l/L1:l/L2,upperdir={D}/c2/diff,workdir={D}/c2/work")
LINKS = {f"{D}/l/INIT1": f"{D}/c1-init/diff", f"{D}/l/INIT2": f"{D}/c2-init/diff",
         f"{D}/l/L1": f"{D}/aaa/diff", f"{D}/l/L2": f"{D}/bbb/diff"}
LOOP = ("40 28 7:3 / /bundles/b1/rootfs rw,nosuid,relatime shared:9 - ext4 /dev/loop3 rw\n"
        "41 28 7:3 /sub /elsewhere rw,relatime - ext4 /dev/loop3 rw\n"
        "42 28 7:4 /rootfs /bundles/b2/rootfs rw,relatime - ext4 /dev/loop4 rw\n"
        "43 28 7:5 / /bundles/b3/rootfs ro,relatime - xfs /dev/loop5 ro\n"
        "44 28 7:6 / /bundles/with\\040space/rootfs ro,noexec,relatime - ext4 /dev/loop6 ro\n"
        "45 28 7:7 / /devmapper/mnt/abc rw,relatime - ext4 /dev/loop7 rw\n")


def test_mountinfo_lines_are_parsed_and_unescaped():
    entries = parse_mountinfo(OVERLAY + "\nnot a mountinfo line\n" + LOOP)
    assert len(entries) == 7
    overlay = entries[0]
    assert (overlay.major, overlay.minor, overlay.fstype, overlay.root) == (0, 123, "overlay", "/")
    assert overlay.super_option("upperdir") == f"{D}/c1/diff"
    assert overlay.super_option("nope") is None
    assert entries[5].mount_point == "/bundles/with space/rootfs" and entries[5].readonly
    assert unescape(r"a\134b") == "a\\b"
    assert [e.mount_point for e in mounts_of_device(7, 3, entries)] == ["/bundles/b1/rootfs", "/elsewhere"]


def test_topmost_mount_wins():
    entries = parse_mountinfo(LOOP + "50 40 0:77 / /bundles/b1/rootfs rw - tmpfs tmpfs rw\n")
    assert mount_at("/bundles/b1/rootfs", entries).fstype == "tmpfs"
    assert mount_at("/bundles/none", entries) is None


def test_overlay_layers_drop_dockers_init_layer_absolute_and_relative():
    for line, init in ((OVERLAY, f"{D}/c1-init/diff"), (RELATIVE, f"{D}/c2-init/diff")):
        layers = overlay_layers(parse_mountinfo(line)[0], lambda p: LINKS.get(p, p))
        assert layers.layers == (f"{D}/aaa/diff", f"{D}/bbb/diff")
        assert layers.init_layer == init
        assert layers.upperdir.endswith("/diff")


def test_overlay_without_init_layer_and_new_mount_api():
    line = ("9 1 0:9 / /m rw - overlay overlay rw,lowerdir+=/x/one,lowerdir+=/x/two,"
            "upperdir=/u/diff,workdir=/u/work")
    layers = overlay_layers(parse_mountinfo(line)[0])
    assert layers.layers == ("/x/one", "/x/two") and layers.init_layer is None


def test_escaped_colon_in_a_layer_path():
    line = r"9 1 0:9 / /m rw - overlay overlay rw,lowerdir=/x/a\:b:/x/c"
    assert overlay_layers(parse_mountinfo(line)[0]).layers == ("/x/a:b", "/x/c")


def test_overlay_key_depends_on_layers_their_order_and_init_content():
    key = overlay_key(["/a", "/b"], "init1")
    assert key.startswith("ovl-") and key == overlay_key(["/a", "/b"], "init1")
    assert key != overlay_key(["/b", "/a"], "init1")
    assert key != overlay_key(["/a"], "init1")
    assert key != overlay_key(["/a", "/b"], "init2")


def test_content_key_sees_every_change(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "f").write_text("one")
    os.symlink("etc/f", tmp_path / "link")
    first = content_key(listing(tmp_path))
    assert first.startswith("cnt-") and first == content_key(listing(tmp_path))
    stat = os.stat(tmp_path / "etc" / "f")
    (tmp_path / "etc" / "f").write_text("two")  # same size, and the old mtime put back
    os.utime(tmp_path / "etc" / "f", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert content_key(listing(tmp_path)) != first  # ctime moved
    second = content_key(listing(tmp_path))
    os.chmod(tmp_path / "etc" / "f", 0o600)
    assert content_key(listing(tmp_path)) != second


def test_contents_listing_ignores_timestamps_but_not_data(tmp_path):
    (tmp_path / "hosts").write_text("")
    before = content_key(listing(tmp_path, contents=True))
    os.utime(tmp_path / "hosts", (1, 1))
    assert content_key(listing(tmp_path, contents=True)) == before
    (tmp_path / "hosts").write_text("x")
    assert content_key(listing(tmp_path, contents=True)) != before


def _numbers(path):
    return {"/dev/loop3": (7, 3), "/dev/loop4": (7, 4), "/dev/loop5": (7, 5), "/dev/loop7": (7, 7)}.get(path)


@pytest.mark.parametrize("rootfs,why", [
    ("/bundles/b1/rootfs", "also mounted at /elsewhere"),
    ("/bundles/b2/rootfs", "only /rootfs of /dev/loop4"),
    ("/bundles/b3/rootfs", "holds xfs"),
    ("/bundles/none", "not a mount point"),
    ("/devmapper/mnt/abc/rootfs", "rootfs/ subdirectory of /dev/loop7"),
    (f"{D}/c1/merged", "overlay mount, not a block device"),
])
def test_passthrough_refusals(rootfs, why):
    plan, reason = passthrough.decide(rootfs, parse_mountinfo(LOOP + OVERLAY), _numbers)
    assert plan is None and why in reason


def test_passthrough_plan_keeps_the_mount_flags():
    text = "60 28 7:7 / /bundles/ok/rootfs rw,nosuid,nodev,relatime shared:3 - ext4 /dev/loop7 rw,errors=remount-ro"
    plan, reason = passthrough.decide("/bundles/ok/rootfs", parse_mountinfo(text), _numbers)
    assert reason == "block device mount"
    assert (plan.device, plan.major, plan.minor, plan.fstype) == ("/dev/loop7", 7, 7, "ext4")
    assert plan.options == "rw,nosuid,nodev,relatime"
