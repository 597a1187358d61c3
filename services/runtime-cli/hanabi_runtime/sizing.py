"""How big a container's VM is: from the OCI resources Docker's --memory and --cpus set.

Pure functions. Guest memory = the container's memory limit + GUEST_OVERHEAD_MIB (the guest
kernel, the initramfs with the agent, page tables: about 50 MiB measured after boot), so the
container itself can use its whole limit. vCPUs = ceil(quota / period) (Docker's --cpus),
else the cpuset's size (--cpuset-cpus), else the config's default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hanabi_common.models.vmmd import MAX_VCPUS

MIB = 1 << 20
GUEST_OVERHEAD_MIB = 64
MIN_GUEST_MIB = 128


@dataclass(frozen=True)
class VmSize:
    """Memory (MiB) and vCPUs for a VM; None means the configured default."""

    memory_mib: int | None
    vcpus: int | None


def _cpuset_size(cpus: str) -> int:
    count = 0
    for part in cpus.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            low, high = part.split("-", 1)
            count += int(high) - int(low) + 1
        else:
            count += 1
    return count


def vm_size(resources: dict | None) -> VmSize:
    """The VM size for `linux.resources` of an OCI config (missing parts: defaults)."""
    resources = resources or {}
    memory_mib = None
    limit = (resources.get("memory") or {}).get("limit")
    if isinstance(limit, int) and limit > 0:
        memory_mib = max(MIN_GUEST_MIB, math.ceil(limit / MIB) + GUEST_OVERHEAD_MIB)
    vcpus = None
    cpu = resources.get("cpu") or {}
    quota, period = cpu.get("quota"), cpu.get("period")
    if isinstance(quota, int) and quota > 0:
        vcpus = math.ceil(quota / (period if isinstance(period, int) and period > 0 else 100_000))
    elif isinstance(cpu.get("cpus"), str) and cpu["cpus"].strip():
        vcpus = _cpuset_size(cpu["cpus"])
    if vcpus is not None:
        vcpus = max(1, min(MAX_VCPUS, vcpus))
    return VmSize(memory_mib=memory_mib, vcpus=vcpus)
