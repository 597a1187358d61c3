"""blockd under a real Docker (private dockerd, overlay2): two containers of one image share a
base keyed by the image's layer chain (Docker's per-container init layer left out), and the
container's own /etc/hostname still arrives (on the binds disk). Two VM boots."""

from __future__ import annotations

import pytest

from hanabi_blockd.client import BlockdClient

pytestmark = pytest.mark.e2e


def test_containers_of_one_docker_image_share_an_overlay_keyed_base(docker):
    if docker.storage_driver != "overlay2":
        pytest.skip(f"dockerd runs with {docker.storage_driver}, not overlay2")
    names = ["blk-a", "blk-b"]
    blockd = BlockdClient(docker.hanabi.config)
    try:
        for name in names:
            done = docker.run_hanabi("-d", "--name", name, cmd=["sleep", "60"], rm=False, timeout=120)
            assert done.returncode == 0, done.stderr
        ids = {docker.inspect(n, "{{.Id}}"): n for n in names}
        roots = {v.sandbox_id: v for v in blockd.list().volumes if v.serial == "hanabi-root"}
        assert set(roots) == set(ids)
        a, b = (roots[i] for i in ids)
        assert a.base_key == b.base_key and a.base_key.startswith("ovl-"), (a.detail, b.detail)
        # The second one never builds (the first, or an earlier test of this image, did).
        assert "init layer" in a.detail and b.detail.endswith("; base reused"), (a.detail, b.detail)
        # The container's own small files still differ: /etc/hostname is its id's start.
        for cid, name in ids.items():
            done = docker.run("exec", name, "cat", "/etc/hostname", timeout=60)
            assert done.stdout.strip() == cid[:12], done.stderr
    finally:
        docker.remove(*names)
    assert [v for v in blockd.list().volumes if v.sandbox_id in ids] == []


def test_root_filesystem_writes_survive_stop_and_start(docker, name):
    """As under runc: a file written in the container's root filesystem is there again after
    `docker stop` / `docker start` (its layer was kept), and nothing stays after `docker rm`."""
    import time

    kept_dir = docker.hanabi.config.block.volume_dir / "kept"
    docker.check("run", "-d", "--runtime=hanabi", "--network", "none", "--name", name,
                 "hanabi-busybox:test", "sleep", "600", timeout=120)
    docker.check("exec", name, "sh", "-c", "echo written-in-run-1 > /persisted.txt && sync", timeout=60)
    docker.check("stop", "-t", "1", name, timeout=60)
    cid = docker.inspect(name, "{{.Id}}")
    assert (kept_dir / f"{cid}.json").exists()
    docker.check("start", name, timeout=120)
    assert docker.check("exec", name, "cat", "/persisted.txt", timeout=60).strip() == "written-in-run-1"
    docker.check("rm", "-f", name, timeout=60)
    deadline = time.monotonic() + 15
    while [p for p in kept_dir.iterdir() if p.name.startswith(cid)]:
        assert time.monotonic() < deadline, "the kept layer of a removed container stayed"
        time.sleep(0.5)
