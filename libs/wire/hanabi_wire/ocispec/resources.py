"""``linux.resources``: the parts the guest applies to the container's cgroup, validated
(pure, no I/O).

``check_resources`` checks the types and ranges of memory, cpu, pids and blockIO (runc's
fields; the agent's cgroups.py turns them into cgroup v2 files and writes them, where a
combination the files cannot express, memory.swap below memory.limit say, is an error).

STDLIB ONLY: runs inside the guest.
"""

from __future__ import annotations

import re

from ..schema import is_int

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

CPUSET_RE = re.compile(r"^[0-9,\- ]{0,256}$")
MAX_I64 = (1 << 63) - 1


def _int(obj: dict[str, Any], key: str, what: str, low: int, high: int = MAX_I64) -> int | None:
    v = obj.get(key)
    if v is None:
        return None
    if not is_int(v) or not low <= v <= high:
        raise ValueError(f"linux.resources.{what}.{key} must be an integer in {low}..{high}")
    return v


def check_resources(v: Any) -> dict[str, Any]:
    """Validate ``linux.resources`` (the parts the guest applies); returns it."""
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ValueError("linux.resources must be an object")
    for part in ("memory", "cpu", "pids", "blockIO"):
        if v.get(part) is not None and not isinstance(v[part], dict):
            raise ValueError(f"linux.resources.{part} must be an object")
    mem = v.get("memory") or {}
    for key in ("limit", "reservation", "swap"):
        _int(mem, key, "memory", -1)
    cpu = v.get("cpu") or {}
    _int(cpu, "shares", "cpu", 0, 262144)
    _int(cpu, "quota", "cpu", -1)
    _int(cpu, "period", "cpu", 0, 1_000_000)
    for key in ("cpus", "mems"):
        if cpu.get(key) is not None and not (isinstance(cpu[key], str) and CPUSET_RE.fullmatch(cpu[key])):
            raise ValueError(f"linux.resources.cpu.{key} must be a CPU list like 0-3,5")
    _int(v.get("pids") or {}, "limit", "pids", -1)
    weight = _int(v.get("blockIO") or {}, "weight", "blockIO", 0, 1000)
    if weight is not None and 0 < weight < 10:
        raise ValueError("linux.resources.blockIO.weight must be 10..1000 (0: not set)")
    return v
