"""The agent's choice of share transport and its 9P mount options (guest/hanabi_guest/share.py)."""

from __future__ import annotations

from hanabi_guest import share


def test_the_kernel_command_line_picks_9p_over_vsock():
    assert share.share_aname("console=ttyS0 quiet") is None
    assert share.share_aname("console=ttyS0 hanabi.share=/export quiet") == "/export"
    assert share.share_aname("hanabi.share=relative") is None
    assert share.share_aname("hanabi.share=/a,b") is None  # would smuggle mount options


def test_fd_options_attach_to_the_export_on_one_stream():
    options = share.fd_options(7, "/export").split(",")
    assert {"trans=fd", "rfdno=7", "wfdno=7", "version=9p2000.L", "aname=/export", "cache=mmap"} <= set(options)
    assert "access=user" in options  # each guest uid attaches as itself: the host checks as that uid


def test_modules_loaded_reads_sysfs(tmp_path):
    (tmp_path / "9p").mkdir()
    assert not share.modules_loaded(("9p", "9pnet_virtio"), str(tmp_path))
    (tmp_path / "9pnet_virtio").mkdir()
    assert share.modules_loaded(("9p", "9pnet_virtio"), str(tmp_path))
