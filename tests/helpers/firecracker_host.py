"""Whether a real Firecracker VM can boot on this host (for the e2e tests and the bench)."""

from __future__ import annotations

import shutil

from hanabi_vmmd import accel
from hanabi_vmmd.firecracker.version import probe_version
from tests.helpers.hanabi import integration_skip_reason


def firecracker_skip_reason() -> str | None:
    """Why a real Firecracker VM cannot boot here ("firecracker not on PATH",
    "/dev/kvm unusable: ...", a too old version, no root or guest image), or None."""
    if shutil.which("firecracker") is None:
        return "firecracker not on PATH"
    problem = accel.kvm_problem(accel.probe_facts())
    if problem:
        return f"/dev/kvm unusable: {problem}"
    version = probe_version("firecracker")
    if not version.ok:
        return version.problem
    return integration_skip_reason()
