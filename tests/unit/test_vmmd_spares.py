"""SpareVmms bookkeeping, with `sleep` processes as the spare VMMs (QEMU's side is
tests/integration/test_spare_vmms.py): how many are kept and for which template, a claim, a
spare that died, a template rebuilt, vmmd's start and stop."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pytest

from hanabi_common.state import StateStore
from hanabi_vmmd import proc
from hanabi_vmmd.hypervisor import VmHandle, VmSpec
from hanabi_vmmd.qemu import QemuHypervisor
from hanabi_vmmd.spares import Spare, SpareVmms, template_identity
from hanabi_vmmd.state import STATE_NAME, HypervisorState
from hanabi_vmmd.templates import Template, TemplateRecord


class Backend:
    name = "qemu"

    def __init__(self, spares: bool = True) -> None:
        self.spares = spares

    def capabilities(self):
        return replace(QemuHypervisor().capabilities(), spares=self.spares)

    def is_alive(self, handle: VmHandle) -> bool:
        return handle.process is not None and handle.process.poll() is None


def template(key: str = "k" * 32, built: float = 1.0) -> Template:
    return Template(key=key, dir=Path("/nonexistent"),
                    record=TemplateRecord(key=key, params={}, created_at=built, boot_to_ready_s=1.0, state_bytes=1))


@pytest.fixture
def spares():
    root = Path(tempfile.mkdtemp(prefix="spares-"))
    store = StateStore(root / "spares")
    started: list[subprocess.Popen] = []
    removed: list[str] = []

    def start(spare_id: str, tpl: Template, backend) -> Spare:
        process = subprocess.Popen(["sleep", "600"], start_new_session=True)
        started.append(process)
        proc.set_idle_priority(process.pid, True)
        vm_dir = root / "vm" / spare_id
        spec = VmSpec.in_dir(spare_id, vm_dir, QemuHypervisor.files, memory_mib=256, vcpus=1, kernel=Path("k"),
                             initrd=Path("i"), cmdline="", accel="tcg")
        handle = VmHandle(spare_id, "qemu", process.pid, proc.start_time(process.pid) or 0, spec.control_socket,
                          spec.agent_socket, vm_dir, process=process)
        state = HypervisorState(sandbox_id=spare_id, hypervisor="qemu", accel="tcg", state="booting",
                                pid=process.pid, start_time=handle.start_time, memory_mib=256, vcpus=1,
                                vm_dir=str(vm_dir), agent_socket=str(spec.agent_socket),
                                control_socket=str(spec.control_socket), console_log="c", stderr_log="e",
                                created_at=time.time(), template=tpl.key)
        store.write(spare_id, STATE_NAME, state)
        return Spare(spare_id, spec, handle, state, template_identity(tpl))

    made: list[SpareVmms] = []

    def make(count: int = 1) -> SpareVmms:
        made.append(SpareVmms(store, count, start, lambda state: removed.append(state.sandbox_id)))
        return made[-1]

    yield make, started, removed, store
    for manager in made:
        manager.close()
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def alive(process: subprocess.Popen) -> bool:
    return process.poll() is None


def test_none_are_started_when_off_or_for_a_backend_without_spares(spares):
    make, started, _, _ = spares
    make(count=0).want(template(), Backend())
    manager = make(count=1)
    manager.want(template(), Backend(spares=False))
    assert manager.settle(5) and started == [] and manager.ready() == 0


def test_a_spare_is_kept_taken_once_at_the_normal_policy_and_refilled(spares):
    make, started, _, store = spares
    manager, backend, tpl = make(count=1), Backend(), template()
    manager.want(tpl, backend)
    assert manager.settle(10) and manager.ready() == 1 and len(started) == 1
    assert os.sched_getscheduler(started[0].pid) == os.SCHED_IDLE
    manager.want(tpl, backend)  # already there: no second one
    assert manager.settle(10) and len(started) == 1
    taken = manager.take(tpl, backend)
    assert taken is not None and taken.handle.pid == started[0].pid
    assert os.sched_getscheduler(taken.handle.pid) == os.SCHED_OTHER
    assert manager.take(tpl, backend) is None
    assert store.list_sandboxes(having=STATE_NAME) == [taken.spare_id]  # until the caller forgets it
    manager.forget(taken)
    assert store.list_sandboxes(having=STATE_NAME) == []
    assert alive(started[0])  # the caller's VM now
    manager.want(tpl, backend)
    assert manager.settle(10) and manager.ready() == 1 and len(started) == 2


def test_a_rebuilt_or_other_template_gets_no_stale_spare(spares):
    make, started, removed, store = spares
    manager, backend, old = make(count=1), Backend(), template(built=1.0)
    manager.want(old, backend)
    assert manager.settle(10) and manager.ready() == 1
    rebuilt = template(built=2.0)  # same key, new memory file
    assert manager.take(rebuilt, backend) is None
    assert manager.take(template(key="o" * 32), backend) is None
    manager.want(rebuilt, backend)
    assert manager.settle(10)
    assert not alive(started[0]) and len(removed) == 1
    assert manager.ready() == 1 and manager.take(rebuilt, backend).handle.pid == started[1].pid


def test_a_spare_that_died_is_dropped_not_handed_out(spares):
    make, started, removed, store = spares
    manager, backend, tpl = make(count=1), Backend(), template()
    manager.want(tpl, backend)
    assert manager.settle(10)
    started[0].send_signal(signal.SIGKILL)
    started[0].wait()
    assert manager.take(tpl, backend) is None
    assert len(removed) == 1 and store.list_sandboxes(having=STATE_NAME) == []


def test_close_kills_the_ready_spares(spares):
    make, started, removed, store = spares
    manager = make(count=2)
    manager.want(template(), Backend())
    assert manager.settle(10) and manager.ready() == 2
    manager.close()
    assert [alive(p) for p in started] == [False, False]
    assert store.list_sandboxes(having=STATE_NAME) == [] and len(removed) == 2


def test_at_start_recorded_spares_are_killed_unless_a_sandbox_owns_the_process(spares):
    make, started, removed, store = spares
    first = make(count=2)
    first.want(template(), Backend())
    assert first.settle(10) and first.ready() == 2
    owned = started[1]
    # vmmd SIGKILLed: its successor finds two records, one of a process a sandbox now owns
    restarted = make(count=1)
    restarted.discard_recorded({(owned.pid, proc.start_time(owned.pid) or 0)})
    assert not alive(started[0]) and alive(owned)
    assert store.list_sandboxes(having=STATE_NAME) == []
    assert len(removed) == 1
