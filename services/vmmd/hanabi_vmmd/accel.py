"""Choosing the accelerator: hardware KVM where it works, QEMU's TCG emulation otherwise.

`probe_facts()` gathers what the host offers (does /dev/kvm open, what KVM API version it
reports, is it the nested "PVM" flavour that stock guest kernels do not boot on);
`decide()` is a pure function of those facts and the configured `vmm.accel`, unit-tested
with injected facts. `resolve()` does both and logs the outcome once, with the reason.
"""

from __future__ import annotations

import fcntl
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from hanabi_vmmd.hypervisor import Accel

log = logging.getLogger("hanabi.vmmd")

KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12
KVM_DEVICE = Path("/dev/kvm")
PVM_MODULE = Path("/sys/module/kvm_pvm")


@dataclass(frozen=True)
class AccelFacts:
    """What the host offers for acceleration."""

    kvm_error: str | None = None
    api_version: int | None = None
    pvm: bool = False


@dataclass(frozen=True)
class AccelDecision:
    """The accelerator to use, and why (one human sentence)."""

    accel: Accel
    reason: str
    forced: bool = False


def probe_facts(device: Path = KVM_DEVICE, pvm_module: Path = PVM_MODULE) -> AccelFacts:
    """Probe /dev/kvm (open + KVM_GET_API_VERSION) and look for the kvm_pvm module."""
    pvm = pvm_module.exists()
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return AccelFacts(kvm_error=f"cannot open {device}: {exc.strerror or exc}", pvm=pvm)
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as exc:
        return AccelFacts(kvm_error=f"KVM_GET_API_VERSION on {device} failed: {exc.strerror or exc}",
                          pvm=pvm)
    finally:
        os.close(fd)
    return AccelFacts(api_version=int(version), pvm=pvm)


def kvm_problem(facts: AccelFacts) -> str | None:
    """Why KVM is not usable on this host, or None if it is."""
    if facts.kvm_error:
        return facts.kvm_error
    if facts.api_version != KVM_API_VERSION:
        return f"KVM API version is {facts.api_version}, expected {KVM_API_VERSION}"
    if facts.pvm:
        return ("the host's KVM is the nested PVM flavour (module kvm_pvm is loaded); "
                "stock guest kernels do not boot on it")
    return None


def decide(requested: str, facts: AccelFacts) -> AccelDecision:
    """Pick kvm or tcg from the configured `vmm.accel` (auto|kvm|tcg) and the host facts."""
    problem = kvm_problem(facts)
    if requested == "kvm":
        note = f" (note: {problem})" if problem else ""
        return AccelDecision("kvm", f"vmm.accel = kvm forces KVM{note}", forced=True)
    if requested == "tcg":
        return AccelDecision("tcg", "vmm.accel = tcg forces TCG software emulation", forced=True)
    if requested != "auto":
        raise ValueError(f"unknown accel {requested!r}")
    if problem is None:
        return AccelDecision("kvm", f"/dev/kvm works (API version {facts.api_version})")
    return AccelDecision("tcg", f"falling back to TCG software emulation: {problem}")


def resolve(requested: str, facts: AccelFacts | None = None) -> AccelDecision:
    """Probe (unless facts are given), decide, and log the decision once."""
    decision = decide(requested, facts if facts is not None else probe_facts())
    level = logging.WARNING if decision.forced and "note:" in decision.reason else logging.INFO
    log.log(level, f"accelerator: {decision.accel}: {decision.reason}",
            extra={"accel": decision.accel, "requested": requested})
    return decision
