"""Pure sizing rules for root filesystem images (unit-tested without root)."""

from __future__ import annotations

MIB = 1 << 20
EXT4_OVERHEAD_RATIO = 1.15  # inode tables, journal, reserved blocks, directories
MIN_IMAGE_MIB = 32


def image_size_bytes(content_bytes: int, inode_count: int, headroom_mib: int) -> int:
    """The size of an ext4 image that holds `content_bytes` in `inode_count` files plus headroom.

    Every file costs at least a block; ext4 needs room for metadata and a journal, and the
    container gets `headroom_mib` to write into. The result is a whole number of MiB.
    """
    if content_bytes < 0 or inode_count < 0 or headroom_mib < 0:
        raise ValueError("sizes must not be negative")
    payload = content_bytes + inode_count * 4096
    total = int(payload * EXT4_OVERHEAD_RATIO) + headroom_mib * MIB + 16 * MIB
    mib = max(MIN_IMAGE_MIB, -(-total // MIB))
    return mib * MIB


def inode_count_for(files: int) -> int:
    """Inodes to ask mke2fs for: the tree's files, twice over, at least 4096."""
    return max(4096, files * 2)
