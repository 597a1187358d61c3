"""The devicemapper backend for real: a loop-backed thin pool of its own, a base thin volume
per image, a thin snapshot per container. Runs wherever `dmsetup targets` lists thin-pool
(as root); skips elsewhere, with the reason the host probe gives."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from hanabi_blockd.client import BlockdClient
from hanabi_blockd.detect import choose_backend, probe_host
from tests.helpers.hanabi import Daemons

pytestmark = pytest.mark.integration
MIB = 1 << 20


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (device-mapper)"
    backend, reason = choose_backend("auto", probe_host())
    return None if backend == "devicemapper" else reason


@pytest.fixture
def dm_blockd(tmp_path):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    pool = f"hanabi-test{os.getpid()}"
    root = tmp_path / "hanabi"
    root.mkdir()
    config = root / "hanabi.toml"
    config.write_text(f'run_dir = "{root}/run"\nlog_level = "debug"\n[block]\nbackend = "devicemapper"\n'
                      f'volume_dir = "{root}/volumes"\ndm_pool_name = "{pool}"\ndm_dir = "{root}/dm"\n'
                      f'dm_data_size_gib = 2\ndm_metadata_size_mib = 16\n')
    daemons = Daemons(root=root, config_path=config)
    daemons.start("blockd")
    yield daemons, pool
    daemons.stop_all()
    names = subprocess.run(["dmsetup", "ls"], capture_output=True, text=True).stdout.split()
    for name in sorted((n for n in names if n.startswith(pool + "-")), reverse=True) + [pool]:
        subprocess.run(["dmsetup", "remove", name], capture_output=True)
    for line in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout.splitlines():
        if str(root / "dm") in line:
            subprocess.run(["losetup", "-d", line.split(":")[0]], check=False)


def _image(path: Path, mib: int) -> Path:
    (path / "etc").mkdir(parents=True)
    (path / "etc" / "marker").write_text("dm image\n")
    with open(path / "big", "wb") as handle:
        for _ in range(mib):
            handle.write(os.urandom(MIB))
    return path


def _sandbox(daemons: Daemons, sid: str) -> str:
    (daemons.config.sandboxes_dir / sid).mkdir(parents=True, exist_ok=True)
    return sid


def _pool_used_blocks(pool: str) -> int:
    status = subprocess.run(["dmsetup", "status", pool], capture_output=True, text=True, check=True).stdout
    return int(status.split()[5].split("/")[0])


def test_snapshots_share_the_base_and_are_removed(dm_blockd, tmp_path):
    daemons, pool = dm_blockd
    client = BlockdClient(daemons.config, timeout=300)
    image = _image(tmp_path / "img", 200)
    first = client.provision(_sandbox(daemons, "d1"), str(image))
    used_after_first = _pool_used_blocks(pool)
    second = client.provision(_sandbox(daemons, "d2"), str(image))
    assert first.backend == "devicemapper" and first.base_key == second.base_key
    assert "base reused" in second.detail
    assert Path(first.path).is_block_device() and Path(second.path).is_block_device()
    # A snapshot costs no data blocks: the pool did not grow by the image again.
    assert _pool_used_blocks(pool) - used_after_first < 16
    listing = client.listing()
    assert listing.pools[0].healthy and [b.holders for b in listing.bases] == [["d1", "d2"]]
    client.release("d1"), client.release("d2")
    assert not Path(first.path).exists() and not Path(second.path).exists()
    assert client.collect(budget_mib=0).removed == [first.base_key]


def test_restart_removes_snapshots_no_sandbox_claims(dm_blockd, tmp_path):
    daemons, pool = dm_blockd
    client = BlockdClient(daemons.config, timeout=300)
    image = _image(tmp_path / "img", 5)
    kept = client.provision(_sandbox(daemons, "kept"), str(image))
    lost = client.provision(_sandbox(daemons, "lost"), str(image))
    (daemons.config.sandboxes_dir / "lost" / "devices.json").unlink()  # as if the record never landed
    daemons.stop("blockd", signal.SIGKILL)
    daemons.start("blockd")
    client = BlockdClient(daemons.config, timeout=300)
    assert Path(kept.path).exists() and not Path(lost.path).exists()
    assert [v.sandbox_id for v in client.list().volumes] == ["kept"]
    client.release("kept")
