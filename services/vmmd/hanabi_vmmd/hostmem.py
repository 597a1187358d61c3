"""How the VMMs vmmd starts use host memory, set once when vmmd starts (`apply`).

Transparent huge pages (`vmm.transparent_hugepages`, off by default): vmmd sets
PR_SET_THP_DISABLE on itself, and every VMM it spawns inherits it (the flag survives fork and
execve). Under TCG the pages QEMU madvises MADV_HUGEPAGE are then 4 KiB pages: its translation
buffer no longer rounds up to 2 MiB pages and the 2 MiB ACPI-table block is no longer one
huge page for the 128 KiB in use, about 3 MiB of PSS less per idle clone here.

KSM (`vmm.ksm`, off by default): QEMU marks guest RAM mergeable only then (qemu_cmdline's
mem-merge); whether anything is merged is the host's ksmd, /sys/kernel/mm/ksm/run, which
vmmd reads and reports but never sets (it is the host's, for every process). A backend whose
guest memory cannot be marked (`Capabilities.mergeable_memory` false: Firecracker) is named
in a warning the first time vmmd makes one of its VMs with `vmm.ksm` on.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

log = logging.getLogger("hanabi.vmmd")
PR_SET_THP_DISABLE = 41
PR_GET_THP_DISABLE = 42
KSM_RUN = Path("/sys/kernel/mm/ksm/run")


def _prctl(option: int, arg: int = 0) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.prctl(option, arg, 0, 0, 0)
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl({option}) failed")
    return int(result)


def disable_thp() -> None:
    """Turn transparent huge pages off for this process and every process it spawns from now."""
    _prctl(PR_SET_THP_DISABLE, 1)


def thp_disabled() -> bool:
    """True when this process (and so what it spawns) runs without transparent huge pages."""
    return _prctl(PR_GET_THP_DISABLE) == 1


def ksm_running(run_file: Path = KSM_RUN) -> str | None:
    """The host's ksmd state: "1" when it merges, "0" stopped, "2" unmerging; None without KSM."""
    try:
        return run_file.read_text().strip()
    except OSError:
        return None


def ksm_problem(ksm: bool, run: str | None) -> str | None:
    """What keeps `vmm.ksm = true` from merging anything on this host (None when it can, or is off)."""
    if not ksm:
        return None
    if run is None:
        return "vmm.ksm is on but this kernel has no KSM (/sys/kernel/mm/ksm/run): nothing is merged"
    if run != "1":
        return (f"vmm.ksm is on but the host's ksmd is not running (/sys/kernel/mm/ksm/run is {run}): "
                "nothing is merged until `echo 1 > /sys/kernel/mm/ksm/run`")
    return None


_unmergeable_named: set[str] = set()


def note_backend(ksm: bool, backend: str, mergeable_memory: bool) -> bool:
    """A VM of `backend` is being made: with `vmm.ksm` on and a backend that cannot mark its
    guest memory mergeable, a warning naming it, once per backend; True when one was logged."""
    if not ksm or mergeable_memory or backend in _unmergeable_named:
        return False
    _unmergeable_named.add(backend)
    log.warning("vmm.ksm is on but this backend cannot mark its guest memory mergeable: its VMs are never merged",
                extra={"hypervisor": backend})
    return True


def apply(transparent_hugepages: bool, ksm: bool) -> None:
    """vmmd's start: THP off for its VMMs unless asked for; a warning when `vmm.ksm` cannot merge."""
    if not transparent_hugepages:
        disable_thp()
    problem = ksm_problem(ksm, ksm_running())
    if problem:
        log.warning(problem)
    log.info("vmm host memory", extra={"transparent_hugepages": not thp_disabled(), "ksm": ksm})
