"""Which Firecracker versions hanabi drives, and how to ask a binary for its version.

The floor is 1.8: from that release on Firecracker describes its virtio-mmio devices to an
x86_64 guest through ACPI, and hanabi's guest kernel finds its block, net and vsock devices
that way (the cmdline carries no `virtio_mmio.device=` entries). Everything else the
backend uses (PATCH /drives, PATCH /vm, hybrid vsock, logger levels) is older than that.
The requests follow the v1.16.1 spec vendored next to this file.

`parse_version` is pure; `probe_version` runs `<binary> --version` once.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

MIN_VERSION = (1, 8, 0)
SPEC_VERSION = (1, 16, 1)
PROBE_TIMEOUT_S = 5.0
_VERSION = re.compile(r"Firecracker v?([0-9]+)\.([0-9]+)\.([0-9]+)")

Version = tuple[int, int, int]


def parse_version(text: str) -> Version | None:
    """(major, minor, patch) from `firecracker --version` output, None if it has none."""
    match = _VERSION.search(text)
    return None if match is None else (int(match[1]), int(match[2]), int(match[3]))


def fmt(version: Version) -> str:
    """'1.16.1'."""
    return ".".join(str(part) for part in version)


@dataclass(frozen=True)
class VersionCheck:
    """What probing a Firecracker binary found: its path and version, or why it is unusable."""

    binary: str
    path: str | None = None
    version: Version | None = None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        """True when the binary exists and is at least MIN_VERSION."""
        return self.problem is None


def judge(binary: str, path: str | None, output: str | None, error: str | None = None) -> VersionCheck:
    """Decide from what running `--version` gave (pure)."""
    if path is None:
        return VersionCheck(binary, problem=f"{binary} not on PATH")
    if error is not None:
        return VersionCheck(binary, path, problem=f"{path} --version failed: {error}")
    version = parse_version(output or "")
    if version is None:
        first = (output or "").strip().splitlines()[:1]
        return VersionCheck(binary, path, problem=f"{path} --version printed no Firecracker version "
                                                  f"({first[0][:120] if first else 'nothing'!r})")
    if version < MIN_VERSION:
        return VersionCheck(binary, path, version,
                            problem=f"{path} is Firecracker {fmt(version)}; hanabi needs >= {fmt(MIN_VERSION)} "
                                    "(ACPI description of virtio-mmio devices on x86_64)")
    return VersionCheck(binary, path, version)


def probe_version(binary: str = "firecracker", timeout: float = PROBE_TIMEOUT_S) -> VersionCheck:
    """Run `<binary> --version` (found on PATH unless it is a path) and judge the answer."""
    path = shutil.which(binary)
    if path is None:
        return judge(binary, None, None)
    try:
        done = subprocess.run([path, "--version"], stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return judge(binary, path, None, f"no answer within {timeout:.0f}s")
    except OSError as exc:
        return judge(binary, path, None, exc.strerror or str(exc))
    out = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
    if done.returncode != 0:
        return judge(binary, path, None, f"exit status {done.returncode}: {out.strip()[:200]}")
    return judge(binary, path, out)
