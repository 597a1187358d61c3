"""blockd's share mounts, with a real blockd and real bind mounts (no VM): binds and the
rootfs go into the export root live, `ro` is read-only on the host side too, release
removes exactly what was made, and a restart removes mounts whose record is gone."""

from __future__ import annotations

import pytest

from hanabi_common.errors import InvalidArgument
from tests.helpers.hanabi import drain, mounts_under
from tests.integration.test_blockd_volumes import blockd, client, sandbox  # noqa: F401

pytestmark = pytest.mark.integration


def _share_root(daemons, name: str = "vm1"):
    root = daemons.config.shares_dir / name
    root.mkdir(parents=True)
    return root


def test_binds_and_rootfs_are_live_and_release_removes_them(blockd, tmp_path):  # noqa: F811
    rootfs, data = tmp_path / "rootfs", tmp_path / "data"
    rootfs.mkdir()
    data.mkdir()
    (data / "f").write_text("host\n")
    share_root = _share_root(blockd)
    sid = sandbox(blockd, "sb1")
    info = client(blockd).provision(sid, str(rootfs), binds=[("m0", str(data), False), ("m1", str(data), True)],
                                    share_root=str(share_root), container_id="c1")
    assert info.layout == "share" and info.share == "c1" and info.binds is None
    cdir = share_root / "c1"
    assert (cdir / "m0" / "f").read_text() == "host\n"
    (cdir / "rootfs" / "written").write_text("x")  # the rootfs itself, not a copy
    assert (rootfs / "written").read_text() == "x"
    with pytest.raises(OSError):  # read-only on the host side too
        (cdir / "m1" / "new").write_text("x")
    assert sorted(mounts_under(share_root)) == [str(cdir / n) for n in ("m0", "m1", "rootfs")]
    assert client(blockd).release(sid).existed
    assert drain(blockd)["blockd"] == []  # unmounted in the background
    assert mounts_under(share_root) == [] and not share_root.exists()
    assert (data / "f").read_text() == "host\n" and (rootfs / "written").exists()  # data untouched


def test_a_socket_source_is_refused_and_nothing_is_left(blockd, tmp_path):  # noqa: F811
    import socket
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "s.sock"))
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    share_root = _share_root(blockd)
    sid = sandbox(blockd, "sb2")
    with pytest.raises(InvalidArgument, match="cannot be shared with a VM"):
        client(blockd).provision(sid, str(rootfs), binds=[("m0", str(tmp_path / "s.sock"), False)],
                                 share_root=str(share_root), container_id="c2")
    sock.close()
    assert mounts_under(share_root) == []
    assert client(blockd).list().volumes == []


def test_a_restart_removes_share_mounts_nobody_claims(blockd, tmp_path):  # noqa: F811
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    share_root = _share_root(blockd)
    sid = sandbox(blockd, "sb3")
    client(blockd).provision(sid, str(rootfs), share_root=str(share_root), container_id="c3")
    blockd.stop("blockd", 9)
    (blockd.config.sandboxes_dir / sid / "devices.json").unlink()  # its record went first
    blockd.start("blockd")
    assert mounts_under(share_root) == []
    assert (rootfs).is_dir()
