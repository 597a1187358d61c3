"""A Docker container's root layer outlives `docker stop` and comes back at `docker start`
(blockd's kept layers), and goes once Docker removed the container. Real blockd, no VM:
a rootfs laid out as Docker's overlay2 does it (`<layer>/merged` beside `<layer>/diff`)."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from tests.helpers.hanabi import drain

from tests.integration.test_blockd_volumes import blockd, client, make_image, sandbox  # noqa: F401

pytestmark = pytest.mark.integration


def test_a_docker_layout_layer_is_kept_taken_back_and_swept(blockd, tmp_path):  # noqa: F811
    layer_dir = tmp_path / "overlay2" / "abc123"
    (layer_dir / "diff").mkdir(parents=True)
    rootfs = make_image(layer_dir / "merged", 2)
    c = client(blockd)
    first = c.provision(sandbox(blockd, "ctr"), str(rootfs))
    with open(first.path, "ab") as layer:  # what the container wrote in its first run
        layer.write(b"\0" * 4096)
    written = os.stat(first.path)
    assert c.release("ctr").existed                      # docker stop
    assert drain(blockd)["blockd"] == []                 # the layer is kept in the background
    kept_dir = blockd.config.block.volume_dir / "kept"
    assert sorted(p.name for p in kept_dir.iterdir()) == ["ctr.json", f"ctr.{first.format}"]
    again = c.provision(sandbox(blockd, "ctr"), str(rootfs))  # docker start: the same layer
    assert again.detail.endswith("layer kept from the last run")
    assert (os.stat(again.path).st_ino, os.stat(again.path).st_size) == (written.st_ino, written.st_size)
    assert list(kept_dir.iterdir()) == []
    other = c.provision(sandbox(blockd, "other"), str(make_image(tmp_path / "plain", 1)))
    assert "kept" not in other.detail
    assert c.release("other").existed and drain(blockd)["blockd"] == []
    assert list(kept_dir.iterdir()) == []  # not Docker's layout: deleted
    assert c.release("ctr").existed
    shutil.rmtree(layer_dir)                               # docker rm: the layer dir goes
    deadline = time.monotonic() + 10
    while list(kept_dir.iterdir()):
        assert time.monotonic() < deadline, list(kept_dir.iterdir())
        time.sleep(0.2)
