"""vmmd's host-memory settings (hostmem): THP off for the VMMs it spawns, and what keeps
`vmm.ksm` from merging anything."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
from pathlib import Path

from hanabi_vmmd import hostmem


def _thp_in_a_fresh_process(queue) -> None:
    hostmem.disable_thp()
    done = subprocess.run([sys.executable, "-c", "print(open('/proc/self/status').read())"],
                          capture_output=True, text=True, check=True)
    status = dict(line.split(":", 1) for line in done.stdout.splitlines() if ":" in line)
    queue.put((hostmem.thp_disabled(), status.get("THP_enabled", "").strip()))


def test_disabling_thp_is_inherited_by_what_is_spawned_after():
    """Run in a child process: the flag is this process's for good (vmmd sets it once)."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_thp_in_a_fresh_process, args=(queue,))
    child.start()
    disabled, spawned = queue.get(timeout=30)
    child.join(30)
    assert child.exitcode == 0
    assert disabled is True
    assert spawned == "0"  # /proc/PID/status of an exec'd grandchild: THP_enabled 0


def test_ksm_problems_name_the_reason(tmp_path: Path):
    run = tmp_path / "run"
    assert hostmem.ksm_problem(False, "qemu", None) is None
    assert hostmem.ksm_problem(True, "qemu", "1") is None
    assert "not running" in (hostmem.ksm_problem(True, "auto", "0") or "")
    assert "no KSM" in (hostmem.ksm_problem(True, "qemu", None) or "")
    assert "Firecracker" in (hostmem.ksm_problem(True, "firecracker", "1") or "")
    assert hostmem.ksm_running(run) is None
    run.write_text("1\n")
    assert hostmem.ksm_running(run) == "1"
