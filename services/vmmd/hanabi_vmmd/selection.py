"""Which VMM backend a VM gets when the runtime asks for `auto` (pure core, probes at the edge).

`auto` takes Firecracker where its binary (at least the supported floor) and a working KVM
exist, and QEMU otherwise (QEMU also runs under TCG emulation). An explicit `qemu` or
`firecracker` is taken as asked; the backend then says plainly why it cannot start.
`choose()` is a pure function of the request and the facts; `decide_auto()` gathers them
(the Firecracker backend's `problem()`, /dev/kvm) and is what vmmd calls once, logging the
outcome. This is the one place `auto` is decided: the runtime asks vmmd (`vm.backend`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hanabi_vmmd.hypervisor import Hypervisor

log = logging.getLogger("hanabi.vmmd")


@dataclass(frozen=True)
class HostFacts:
    """What decides between the backends: why Firecracker or KVM cannot be used (None: can)."""

    firecracker_problem: str | None
    kvm_problem: str | None


@dataclass(frozen=True)
class Choice:
    """The backend to use and one human sentence saying why."""

    backend: str
    reason: str


def firecracker_unusable(facts: HostFacts) -> str | None:
    """Why Firecracker cannot run VMs on this host, or None if it can."""
    if facts.firecracker_problem:
        return facts.firecracker_problem
    if facts.kvm_problem:
        return f"Firecracker needs KVM: {facts.kvm_problem}"
    return None


def choose(requested: str, facts: HostFacts, offered: frozenset[str] | set[str]) -> Choice:
    """Map `auto|qemu|firecracker` to a backend this vmmd offers."""
    if requested != "auto":
        return Choice(requested, f"asked for {requested}")
    problem = firecracker_unusable(facts)
    if problem is None and "firecracker" in offered:
        return Choice("firecracker", "auto: firecracker and KVM are usable")
    why = problem or "this vmmd has no firecracker backend"
    return Choice("qemu", f"auto: QEMU, since {why}")


def decide_auto(backends: Mapping[str, Hypervisor]) -> Choice:
    """Probe the host once and choose for `auto` among `backends`; log the choice and why."""
    from hanabi_vmmd import accel

    fc = backends.get("firecracker")
    fc_problem = fc.problem() if fc is not None else "this vmmd has no firecracker backend"
    facts = HostFacts(firecracker_problem=fc_problem, kvm_problem=accel.kvm_problem(accel.probe_facts()))
    choice = choose("auto", facts, set(backends))
    log.info(f"hypervisor auto -> {choice.backend}: {choice.reason}",
             extra={"hypervisor": choice.backend, "reason": choice.reason})
    return choice
