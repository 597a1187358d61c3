"""/proc/self/mountinfo, parsed (pure) and read (one I/O edge).

A line is `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS`
(proc(5)); ROOT, MOUNTPOINT and SOURCE escape space, tab, newline and backslash as `\\ooo`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_ESCAPE = re.compile(r"\\([0-7]{3})")


def unescape(field: str) -> str:
    """Undo the kernel's octal escapes (`\\040` is a space)."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class MountEntry:
    """One mount, as the kernel lists it."""

    mount_id: int
    parent_id: int
    major: int
    minor: int
    root: str
    mount_point: str
    options: tuple[str, ...]
    fstype: str
    source: str
    super_options: str

    @property
    def readonly(self) -> bool:
        """True if the mount (per-mount flags) is read-only."""
        return "ro" in self.options

    def super_option(self, name: str) -> str | None:
        """The value of `name=` in the superblock options, or None.

        overlayfs escapes commas inside a value as `\\,`; split on unescaped commas only.
        """
        for part in re.split(r"(?<!\\),", self.super_options):
            key, _, value = part.partition("=")
            if key == name:
                return value.replace("\\,", ",")
        return None


def parse_mountinfo(text: str) -> list[MountEntry]:
    """Every mount of `text`, in the kernel's order (later entries stack on earlier ones)."""
    entries = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            dash = fields.index("-", 6)
            major, minor = fields[2].split(":")
            entries.append(MountEntry(
                mount_id=int(fields[0]), parent_id=int(fields[1]), major=int(major),
                minor=int(minor), root=unescape(fields[3]), mount_point=unescape(fields[4]),
                options=tuple(fields[5].split(",")), fstype=fields[dash + 1],
                source=unescape(fields[dash + 2]),
                super_options=fields[dash + 3] if len(fields) > dash + 3 else ""))
        except (ValueError, IndexError):
            continue  # a malformed line never hides the others
    return entries


def mount_at(path: str, entries: list[MountEntry]) -> MountEntry | None:
    """The topmost mount whose mount point is exactly `path` (already resolved), or None."""
    found = None
    for entry in entries:
        if entry.mount_point == path:
            found = entry
    return found


def mounts_of_device(major: int, minor: int, entries: list[MountEntry]) -> list[MountEntry]:
    """Every mount of the block device major:minor."""
    return [e for e in entries if (e.major, e.minor) == (major, minor)]


def read_mountinfo() -> list[MountEntry]:
    """This process's mounts."""
    return parse_mountinfo(Path("/proc/self/mountinfo").read_text())
