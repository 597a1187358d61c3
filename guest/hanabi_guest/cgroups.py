"""linux.resources applied to the container's cgroup v2 group in the guest (as runc's fs2).

``plan_files`` turns the object (validated by hanabi_wire.ocispec.resources) into
``(file, value)`` writes (pure), with runc's conversions: memory.limit -> memory.max, reservation ->
memory.low, swap (memory+swap, as in v1) -> memory.swap.max = swap - limit; cpu quota and
period -> cpu.max; shares -> cpu.weight (1 + (shares - 2) * 9999 / 262142); pids.limit ->
pids.max (0 or less: max); blockIO.weight -> io.weight (``default 1 + (w - 10) * 9999 / 990``, when the guest
has the io controller and io.weight); cpu.mems -> cpuset.mems. ``cpu.cpus`` names the *host's* CPUs: the VM
got as many vCPUs as the set has (sizing on the host), so the guest's cpuset.cpus is all of
them (``0-N``); see README. ``apply(cgroup, files)`` enables the controllers in the guest's
root group and writes the files; a value the kernel refuses is an error naming the field.
``linux.resources.devices`` (the device cgroup) is not enforced: see README.

STDLIB ONLY: runs inside the guest.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

CONTROLLERS = ("cpu", "cpuset", "memory", "pids", "io")
# Which field of linux.resources each written file came from (for error messages).
FIELD_OF = {"memory.max": "memory.limit", "memory.low": "memory.reservation",
            "memory.swap.max": "memory.swap", "cpu.max": "cpu.quota", "cpu.weight": "cpu.shares",
            "cpuset.cpus": "cpu.cpus", "cpuset.mems": "cpu.mems", "pids.max": "pids.limit",
            "io.weight": "blockIO.weight"}


def shares_to_weight(shares: int) -> int:
    """runc's cgroup v1 cpu.shares -> v2 cpu.weight."""
    if shares == 0:
        return 0
    return 1 + ((shares - 2) * 9999) // 262142


def plan_files(res: dict[str, Any], ncpus: int) -> list[tuple[str, str]]:
    """The cgroup files to write for ``res`` in a guest with ``ncpus`` CPUs."""
    out: list[tuple[str, str]] = []
    mem = res.get("memory") or {}
    limit = mem.get("limit")
    if limit is not None and limit != 0:
        out.append(("memory.max", "max" if limit < 0 else str(limit)))
    if mem.get("reservation") not in (None, 0):
        out.append(("memory.low", "max" if mem["reservation"] < 0 else str(mem["reservation"])))
    swap = mem.get("swap")
    if swap not in (None, 0):
        if swap < 0:
            out.append(("memory.swap.max", "max"))
        elif limit is None or limit <= 0:
            raise ValueError("linux.resources.memory.swap needs memory.limit (it is memory+swap)")
        elif swap < limit:
            raise ValueError("linux.resources.memory.swap must not be below memory.limit")
        else:
            out.append(("memory.swap.max", str(swap - limit)))
    cpu = res.get("cpu") or {}
    quota, period = cpu.get("quota"), cpu.get("period")
    if quota not in (None, 0) or period not in (None, 0):
        q = "max" if quota is None or quota <= 0 else str(quota)
        out.append(("cpu.max", f"{q} {period or 100000}"))
    if cpu.get("shares"):
        out.append(("cpu.weight", str(shares_to_weight(cpu["shares"]))))
    if cpu.get("cpus"):
        out.append(("cpuset.cpus", f"0-{ncpus - 1}" if ncpus > 1 else "0"))
    if cpu.get("mems"):
        out.append(("cpuset.mems", "0"))
    limit = (res.get("pids") or {}).get("limit")
    if limit is not None and limit != 0:
        out.append(("pids.max", "max" if limit < 0 else str(limit)))
    weight = (res.get("blockIO") or {}).get("weight")
    if weight:
        out.append(("io.weight", f"default {1 + (weight - 10) * 9999 // 990}"))
    return out


def enable_controllers(root: str) -> set[str]:
    """Enable every available controller of ``CONTROLLERS`` for the root's children."""
    try:
        with open(os.path.join(root, "cgroup.controllers"), encoding="ascii") as f:
            available = set(f.read().split())
        with open(os.path.join(root, "cgroup.subtree_control"), encoding="ascii") as f:
            enabled = set(f.read().split())
    except OSError:
        return set()
    for name in CONTROLLERS:
        if name in available and name not in enabled:
            try:
                with open(os.path.join(root, "cgroup.subtree_control"), "w", encoding="ascii") as f:
                    f.write("+" + name)
                enabled.add(name)
            except OSError:
                pass
    return enabled


def apply(cgroup: str, files: list[tuple[str, str]]) -> None:
    """Write ``files`` into ``cgroup`` (its parent's controllers enabled first)."""
    if not files:
        return
    enabled = enable_controllers(os.path.dirname(cgroup.rstrip("/")))
    for name, value in files:
        controller = name.split(".", 1)[0]
        field = "linux.resources." + FIELD_OF.get(name, name)
        if controller not in enabled:
            raise ValueError(f"{field}: the guest kernel has no {controller} controller")
        try:
            with open(os.path.join(cgroup, name), "w", encoding="ascii") as f:
                f.write(value)
        except OSError as exc:
            raise ValueError(f"{field}: the guest refused {name} = {value!r}: {exc.strerror}") from None
