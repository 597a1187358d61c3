"""The guest's check that a disk swapped into a Firecracker placeholder is fully visible:
ext4 superblock size against a fake /sys/block/<name>/size."""

from __future__ import annotations

import struct
from pathlib import Path

from hanabi_guest import blkswap


def ext4_image(path: Path, blocks: int, log_block: int = 2, hi: int = 0) -> None:
    sb = bytearray(1024)
    struct.pack_into("<I", sb, 0x04, blocks)
    struct.pack_into("<I", sb, 0x18, log_block)
    struct.pack_into("<H", sb, 0x38, 0xEF53)
    if hi:
        struct.pack_into("<I", sb, 0x60, 0x80)
        struct.pack_into("<I", sb, 0x150, hi)
    path.write_bytes(bytes(1024) + bytes(sb))


def fake_sysfs(root: Path, name: str, sectors: int) -> str:
    d = root / "sys" / "block" / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "size").write_text(f"{sectors}\n")
    return str(root / "sys")


def test_ext4_bytes(tmp_path):
    img = tmp_path / "fs.img"
    ext4_image(img, blocks=25600)  # 100 MiB of 4 KiB blocks
    assert blkswap.ext4_bytes(img.read_bytes()) == 100 << 20
    ext4_image(img, blocks=1, hi=1)  # 64bit feature: (2^32 + 1) blocks
    assert blkswap.ext4_bytes(img.read_bytes()) == ((1 << 32) + 1) * 4096
    assert blkswap.ext4_bytes(bytes(2048)) is None  # an empty placeholder
    assert blkswap.ext4_bytes(b"short") is None


def test_settled_waits_for_the_new_capacity(tmp_path):
    node = tmp_path / "vdb"
    ext4_image(node, blocks=25600)
    sysfs = fake_sysfs(tmp_path, "vdb", 2048)  # still the 1 MiB placeholder's size
    assert not blkswap.settled("vdb", str(node), sysfs)
    fake_sysfs(tmp_path, "vdb", (100 << 20) // 512)  # the config-change interrupt arrived
    assert blkswap.settled("vdb", str(node), sysfs)


def test_settled_takes_non_ext4_disks_as_they_are_and_missing_nodes_as_not_yet(tmp_path):
    node = tmp_path / "vdc"
    node.write_bytes(bytes(4096))
    sysfs = fake_sysfs(tmp_path, "vdc", 8)
    assert blkswap.settled("vdc", str(node), sysfs)
    assert not blkswap.settled("vdd", str(tmp_path / "vdd"), sysfs)
    assert blkswap.device_bytes("vdx", sysfs) is None
