"""blockd under a real Docker (private dockerd, overlay2): a container's root filesystem is
Docker's own merged overlay directory, shared live into its VM (no base image is built, no
disk is attached), and its small bind-mounted files (/etc/hostname) arrive live too."""

from __future__ import annotations

import pytest

from hanabi_blockd.client import BlockdClient

pytestmark = pytest.mark.e2e


def test_a_docker_rootfs_is_its_merged_overlay_dir_shared_into_the_vm(docker):
    if docker.storage_driver != "overlay2":
        pytest.skip(f"dockerd runs with {docker.storage_driver}, not overlay2")
    names = ["blk-a", "blk-b"]
    blockd = BlockdClient(docker.hanabi.config)
    bases_before = {b.key for b in blockd.listing().bases}
    try:
        for name in names:
            done = docker.run_hanabi("-d", "--name", name, cmd=["sleep", "60"], rm=False, timeout=120)
            assert done.returncode == 0, done.stderr
        ids = {docker.inspect(n, "{{.Id}}"): n for n in names}
        roots = {v.sandbox_id: v for v in blockd.list().volumes if v.sandbox_id in ids}
        assert set(roots) == set(ids)
        for cid, volume in roots.items():
            assert volume.layout == "share" and volume.binds is None, volume
            assert volume.source == docker.inspect(ids[cid], "{{.GraphDriver.Data.MergedDir}}")
            done = docker.run("exec", ids[cid], "cat", "/etc/hostname", timeout=60)
            assert done.stdout.strip() == cid[:12], done.stderr
        assert {b.key for b in blockd.listing().bases} == bases_before  # nothing was built
    finally:
        docker.remove(*names)
    assert [v for v in blockd.list().volumes if v.sandbox_id in ids] == []
