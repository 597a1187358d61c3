"""A "newc" cpio archive writer for the initramfs (what the kernel unpacks at boot).

Written in Python rather than with cpio(1) so the archive is reproducible (sorted names,
mtime 0, owner root) and can hold device nodes (/dev/console) without root or mknod.
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


class CpioWriter:
    """Append entries to a newc archive; ``close()`` writes the trailer."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.ino = 0
        self.names: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.strip("/") or "."
        if name in self.names:
            raise ValueError(f"duplicate cpio entry {name}")
        self.names.add(name)
        self.ino += 1
        raw = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data), 0, 0,
                  rdev[0], rdev[1], len(raw), 0)
        head = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.out.write(head + raw + _pad(len(head) + len(raw)))
        self.out.write(data + _pad(len(data)))

    def add_dir(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | mode)

    def add_file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def add_symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def add_chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def add_tree(self, root: str) -> None:
        """Add everything under ``root`` (names relative to it), in sorted order."""
        for dirpath, dirs, files in os.walk(root):
            dirs.sort()
            rel = os.path.relpath(dirpath, root)
            if rel != "." and rel not in self.names:
                self.add_dir(rel, stat.S_IMODE(os.lstat(dirpath).st_mode))
            for f in sorted(files + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]):
                path = os.path.join(dirpath, f)
                name = os.path.normpath(os.path.join(rel, f))
                st = os.lstat(path)
                if stat.S_ISLNK(st.st_mode):
                    self.add_symlink(name, os.readlink(path))
                elif stat.S_ISREG(st.st_mode):
                    with open(path, "rb") as fh:
                        self.add_file(name, fh.read(), stat.S_IMODE(st.st_mode))
                else:
                    raise ValueError(f"unsupported file type in initramfs tree: {path}")
            dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(dirpath, d))]

    def close(self) -> None:
        self._entry("TRAILER!!!", 0)
