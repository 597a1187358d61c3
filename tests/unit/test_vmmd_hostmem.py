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
    assert hostmem.ksm_problem(False, None) is None
    assert hostmem.ksm_problem(True, "1") is None
    assert "not running" in (hostmem.ksm_problem(True, "0") or "")
    assert "no KSM" in (hostmem.ksm_problem(True, None) or "")
    assert hostmem.ksm_running(run) is None
    run.write_text("1\n")
    assert hostmem.ksm_running(run) == "1"


def test_a_backend_that_cannot_merge_is_named_once_when_ksm_is_on(caplog):
    """Capabilities say which backends mark guest memory mergeable: QEMU does, Firecracker not."""
    from hanabi_vmmd.firecracker.backend import FirecrackerHypervisor
    from hanabi_vmmd.qemu import QemuHypervisor

    assert QemuHypervisor().capabilities().mergeable_memory
    assert not FirecrackerHypervisor().capabilities().mergeable_memory
    name = "unmergeable-test-backend"
    assert not hostmem.note_backend(False, name, False)  # ksm off: nothing to say
    assert not hostmem.note_backend(True, "mergeable-test-backend", True)
    with caplog.at_level("WARNING", logger="hanabi.vmmd"):
        assert hostmem.note_backend(True, name, False)
        assert not hostmem.note_backend(True, name, False)  # once per backend
    assert [r.hypervisor for r in caplog.records if "never merged" in r.getMessage()] == [name]
