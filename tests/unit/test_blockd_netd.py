"""blockd's pure sizing and backend choice; netd's netns checks (no root needed)."""

from __future__ import annotations

import os

import pytest

from hanabi_blockd.detect import HostBlockFacts, choose_backend
from hanabi_blockd.sizing import MIB, image_size_bytes, inode_count_for
from hanabi_common.errors import InvalidArgument
from hanabi_netd.service import check_netns


def test_sizes_grow_with_content_and_are_whole_mib():
    small = image_size_bytes(1 * MIB, 100, headroom_mib=64)
    big = image_size_bytes(200 * MIB, 5000, headroom_mib=64)
    assert small % MIB == 0 and big % MIB == 0
    assert big > 200 * MIB + 64 * MIB > small
    assert image_size_bytes(0, 0, 0) == 32 * MIB
    assert inode_count_for(10) == 4096 and inode_count_for(10000) == 20000
    with pytest.raises(ValueError):
        image_size_bytes(-1, 0, 0)


def test_backend_choice():
    no_dm = HostBlockFacts(device_mapper=False, thin_pool_target=False)
    assert choose_backend("auto", no_dm) == ("loopfile", "the kernel has no device-mapper (/proc/misc lists none)")
    assert choose_backend("loopfile", no_dm)[0] == "loopfile"
    with pytest.raises(RuntimeError, match="no device-mapper"):
        choose_backend("devicemapper", no_dm)
    no_thin = HostBlockFacts(device_mapper=True, thin_pool_target=False)
    assert "thin-pool" in choose_backend("auto", no_thin)[1]


def test_netns_checks(tmp_path):
    check_netns(f"/proc/{os.getpid()}/ns/net")
    with pytest.raises(InvalidArgument, match="does not exist"):
        check_netns(str(tmp_path / "nope"))
    with pytest.raises(InvalidArgument, match="not a network namespace"):
        check_netns("/etc/hostname")
    with pytest.raises(InvalidArgument, match="absolute"):
        check_netns("relative/ns")
    with pytest.raises(InvalidArgument, match="not a network namespace"):
        check_netns(f"/proc/{os.getpid()}/ns/uts")
