"""vmmd writes a VM's pid only into real cgroup directories under /sys/fs/cgroup."""

from __future__ import annotations

import os

import pytest

from hanabi_common.errors import InvalidArgument
from hanabi_common.models.vmmd import CreateVm
from hanabi_vmmd.cgroup import checked_dirs


@pytest.mark.parametrize("path", ["/etc", "/sys/fs/cgroup/../../etc", "/sys/fs/cgroup/no-such-group"])
def test_only_cgroup_dirs_are_accepted(path):
    with pytest.raises(InvalidArgument, match="not a cgroup directory"):
        checked_dirs([path])


def test_the_request_refuses_paths_outside_the_cgroup_tree():
    with pytest.raises(ValueError):
        CreateVm(sandbox_id="s", cgroup_dirs=["/tmp/x"])


@pytest.mark.skipif(not os.path.exists("/sys/fs/cgroup/cgroup.procs")
                    and not os.path.exists("/sys/fs/cgroup/memory/cgroup.procs"), reason="no cgroup tree mounted")
def test_a_real_cgroup_dir_is_accepted():
    root = "/sys/fs/cgroup" if os.path.exists("/sys/fs/cgroup/cgroup.procs") else "/sys/fs/cgroup/memory"
    assert [str(p) for p in checked_dirs([root + "/"])] == [root]
