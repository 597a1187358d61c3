"""blockd's pure sizing and backend choice (no root needed)."""

from __future__ import annotations

import pytest

from hanabi_blockd.detect import HostBlockFacts, choose_backend
from hanabi_blockd.sizing import MIB, image_size_bytes, inode_count_for


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

