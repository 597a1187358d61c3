"""Which block backend this host can use, and why (pure decision + the probes feeding it)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class HostBlockFacts:
    """What the host offers for block provisioning."""

    device_mapper: bool
    thin_pool_target: bool


def probe_host() -> HostBlockFacts:
    """Read /proc/misc and `dmsetup targets`."""
    try:
        misc = Path("/proc/misc").read_text()
    except OSError:
        misc = ""
    has_dm = "device-mapper" in misc
    thin = False
    if has_dm and shutil.which("dmsetup"):
        try:
            out = subprocess.run(["dmsetup", "targets"], capture_output=True, text=True, timeout=10).stdout
            thin = any(line.split()[:1] == ["thin-pool"] for line in out.splitlines())
        except (OSError, subprocess.SubprocessError):
            thin = False
    return HostBlockFacts(device_mapper=has_dm, thin_pool_target=thin)


def choose_backend(wanted: str, facts: HostBlockFacts) -> tuple[str, str]:
    """Return (backend, reason) for the configured wish `auto|loopfile|devicemapper`."""
    if wanted == "loopfile":
        return "loopfile", "configured"
    if not facts.device_mapper:
        why = "the kernel has no device-mapper (/proc/misc lists none)"
    elif not facts.thin_pool_target:
        why = "device-mapper has no thin-pool target (`dmsetup targets`)"
    else:
        return "devicemapper", "device-mapper lists the thin-pool target"
    if wanted == "devicemapper":
        raise RuntimeError(f"block backend devicemapper was configured but {why}")
    return "loopfile", why
