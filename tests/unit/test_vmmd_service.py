"""VmService logic with a fake hypervisor that runs `sleep` processes (no root, no qemu)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from collections.abc import Callable, Collection

import pytest

from hanabi_common.config import Config, VmmConfig
from hanabi_common.errors import (AlreadyExists, FailedPrecondition, InvalidArgument, NotFound,
                                  Unavailable)
from hanabi_common.models.base import Drain, NoArgs, SandboxRef
from hanabi_common.models.vmmd import AttachDisk, CreateVm, DetachDisk, StopVm
from hanabi_vmmd import proc
from hanabi_vmmd.accel import AccelDecision
from hanabi_vmmd.hypervisor import Capabilities, DiskSpec, StopResult, VmHandle, VmSpec
from hanabi_vmmd.qemu import QemuHypervisor
from hanabi_common.locks import KeyedLocks
from hanabi_vmmd.qemu_cmdline import pick_slot
from hanabi_vmmd.service import VmService
from hanabi_vmmd.state import STATE_NAME, HypervisorState


class FakeHypervisor:
    """A 'VM' is a `sleep` in its own session; disks and pause are just recorded."""

    name = "qemu"
    binary = "sleep"
    machine = "q35"
    files = QemuHypervisor.files

    def capabilities(self) -> Capabilities:
        return replace(QemuHypervisor().capabilities(), share=None, templates=False)  # a sleep cannot be cloned

    def problem(self) -> str | None:
        return None

    def guest_serial(self, handle: VmHandle, disk: DiskSpec) -> str:
        return ""

    def __init__(self, fail_start: bool = False) -> None:
        self.fail_start = fail_start
        self.paused: set[str] = set()
        self.disks: dict[str, str] = {}
        self.spawned: list[int] = []

    def start(self, spec: VmSpec, on_spawned: Callable[[VmHandle], None] | None = None) -> VmHandle:
        spec.vm_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        spec.agent_socket.touch()
        spec.stderr_log.write_text("fake qemu\n")
        process = subprocess.Popen(["sleep", "600"], start_new_session=True)
        self.spawned.append(process.pid)
        spec.pid_file.write_text(f"{process.pid}\n")
        handle = VmHandle(spec.sandbox_id, self.name, process.pid, proc.start_time(process.pid) or 0,
                          spec.control_socket, spec.agent_socket, spec.vm_dir, "q35", 2, process)
        if on_spawned:
            on_spawned(handle)
        if self.fail_start:
            process.kill()
            process.wait()
            raise Unavailable("QEMU exited with status 1 while starting: boom")
        return handle

    def attach_disk(self, handle: VmHandle, disk: DiskSpec, busy_slots: Collection[str]) -> str:
        slot = pick_slot("q35", 2, busy_slots)
        if slot is None:
            raise FailedPrecondition("no free hot-plug slot")
        self.disks[disk.device_id] = slot
        return slot

    def detach_disk(self, handle: VmHandle, disk: DiskSpec, timeout: float) -> None:
        self.disks.pop(disk.device_id, None)

    def pause(self, handle: VmHandle) -> None:
        self.paused.add(handle.sandbox_id)

    def resume(self, handle: VmHandle) -> None:
        self.paused.discard(handle.sandbox_id)

    def query_paused(self, handle: VmHandle) -> bool | None:
        return handle.sandbox_id in self.paused

    def stop(self, handle: VmHandle, timeout: float) -> StopResult:
        alive = self.is_alive(handle)
        proc.kill_verified(handle.pid, handle.start_time, signal.SIGTERM)
        code = handle.process.wait(5) if handle.process else None
        proc.wait_gone(handle.pid, handle.start_time, 5)
        return StopResult(alive, proc.exit_status(code), False)

    def is_alive(self, handle: VmHandle) -> bool:
        if handle.process is not None and handle.process.poll() is not None:
            return False
        return proc.is_alive(handle.pid, handle.start_time)


@pytest.fixture
def env():
    root = Path(tempfile.mkdtemp(prefix="vmmd-", dir="/tmp"))
    guest = root / "guest"
    guest.mkdir()
    (guest / "vmlinux").write_bytes(b"k")
    (guest / "initrd.img").write_bytes(b"i")
    config = Config(run_dir=root / "run", vmm=VmmConfig(guest_dir=guest, stop_timeout_s=1))
    config.sandboxes_dir.mkdir(parents=True)
    backend = FakeHypervisor()
    services: list[VmService] = []

    def make() -> VmService:
        service = VmService(config, backends={"qemu": backend},
                            accel=AccelDecision("tcg", "test"))
        services.append(service)
        return service

    yield config, backend, make, root
    for service in services:
        service.close()
    for pid in backend.spawned:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(root, ignore_errors=True)


def test_lifecycle(env):
    config, backend, make, root = env
    svc = make()
    info = svc.create(CreateVm(sandbox_id="sb1", memory_mib=128))
    assert info.state == "running" and info.memory_mib == 128 and info.vcpus == 1 and info.accel == "tcg"
    assert Path(info.agent_socket).exists() and Path(info.agent_socket).parent.parent == root / "run" / "vm"
    with pytest.raises(AlreadyExists):
        svc.create(CreateVm(sandbox_id="sb1"))
    assert svc.get(SandboxRef(sandbox_id="sb1")).pid == info.pid
    assert [v.sandbox_id for v in svc.list(NoArgs()).vms] == ["sb1"]
    assert svc.pause(SandboxRef(sandbox_id="sb1")).state == "paused"
    assert svc.pause(SandboxRef(sandbox_id="sb1")).state == "paused"
    assert svc.resume(SandboxRef(sandbox_id="sb1")).state == "running"
    assert svc.stop(StopVm(sandbox_id="sb1")).existed
    assert not proc.is_alive(info.pid, None)
    assert not Path(info.agent_socket).parent.exists()
    assert not (config.sandboxes_dir / "sb1").exists()
    assert not svc.stop(StopVm(sandbox_id="sb1")).existed
    with pytest.raises(NotFound):
        svc.get(SandboxRef(sandbox_id="sb1"))
    svc._events.submit(lambda: None).result(timeout=10)  # an exit report in flight holds sb1's lock
    assert len(svc.locks) == 0


def test_missing_guest_kernel_is_a_clear_precondition(env):
    config, backend, make, root = env
    (config.vmm.guest_dir / "vmlinux").unlink()
    with pytest.raises(FailedPrecondition, match="vmlinux missing"):
        make().create(CreateVm(sandbox_id="sb1"))
    assert not backend.spawned


def test_failed_start_leaves_nothing(env):
    config, backend, make, root = env
    backend.fail_start = True
    svc = make()
    with pytest.raises(Unavailable, match="boom"):
        svc.create(CreateVm(sandbox_id="sb1"))
    assert svc.list(NoArgs()).vms == []
    assert list((root / "run" / "vm").iterdir()) == []
    assert not (config.sandboxes_dir / "sb1").exists()


def test_unknown_hypervisor(env):
    with pytest.raises(FailedPrecondition, match="firecracker"):
        env[2]().create(CreateVm(sandbox_id="sb1", hypervisor="firecracker"))


def test_disks(env):
    config, backend, make, root = env
    svc = make()
    image = root / "disk.img"
    image.write_bytes(b"\0" * 4096)
    with pytest.raises(NotFound):
        svc.devices.attach_disk(AttachDisk(sandbox_id="sb1", path=str(image), serial="r0"))
    svc.create(CreateVm(sandbox_id="sb1"))
    for bad in ("relative.img", str(root / "nope.img"), str(root)):
        with pytest.raises(InvalidArgument):
            svc.devices.attach_disk(AttachDisk(sandbox_id="sb1", path=bad, serial="r0"))
    disk = svc.devices.attach_disk(AttachDisk(sandbox_id="sb1", path=str(image), serial="r0"))
    assert disk.device_id == "disk-r0" and backend.disks == {"disk-r0": "rp0"}
    with pytest.raises(AlreadyExists):
        svc.devices.attach_disk(AttachDisk(sandbox_id="sb1", path=str(image), serial="r0"))
    svc.devices.attach_disk(AttachDisk(sandbox_id="sb1", path=str(image), serial="r1", readonly=True))
    assert backend.disks["disk-r1"] == "rp1"
    with pytest.raises(FailedPrecondition, match="slot"):
        svc.devices.attach_disk(AttachDisk(sandbox_id="sb1", path=str(image), serial="r2"))
    assert svc.get(SandboxRef(sandbox_id="sb1")).disks == ["disk-r0", "disk-r1"]
    svc.pause(SandboxRef(sandbox_id="sb1"))
    with pytest.raises(FailedPrecondition, match="paused"):
        svc.devices.attach_disk(AttachDisk(sandbox_id="sb1", path=str(image), serial="r3"))
    with pytest.raises(FailedPrecondition, match="paused"):
        svc.devices.detach_disk(DetachDisk(sandbox_id="sb1", device_id="disk-r0"))
    svc.resume(SandboxRef(sandbox_id="sb1"))
    assert svc.devices.detach_disk(DetachDisk(sandbox_id="sb1", device_id="disk-r0")).existed
    assert not svc.devices.detach_disk(DetachDisk(sandbox_id="sb1", device_id="disk-r0")).existed
    assert svc.devices.attach_disk(AttachDisk(sandbox_id="sb1", path=str(image), serial="r4")).device_id == "disk-r4"
    assert backend.disks["disk-r4"] == "rp0"


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_reaper_marks_a_vm_that_exits_on_its_own(env):
    config, backend, make, root = env
    svc = make()
    info = svc.create(CreateVm(sandbox_id="sb1"))
    os.kill(info.pid, signal.SIGKILL)

    def stopped() -> bool:
        state = svc.store.read("sb1", STATE_NAME, HypervisorState)
        return state is not None and state.state == "stopped"
    assert wait_for(stopped)
    vm = svc.get(SandboxRef(sandbox_id="sb1"))
    assert vm.state == "stopped" and vm.exit_status == 137
    with pytest.raises(FailedPrecondition, match="stopped"):
        svc.pause(SandboxRef(sandbox_id="sb1"))
    assert svc.stop(StopVm(sandbox_id="sb1")).existed
    assert svc.list(NoArgs()).vms == []


def test_restart_readopts_live_vms_and_marks_dead_ones(env):
    config, backend, make, root = env
    first = make()
    live = first.create(CreateVm(sandbox_id="live"))
    dead = first.create(CreateVm(sandbox_id="dead"))
    first.pause(SandboxRef(sandbox_id="live"))
    first.close()  # vmmd goes away; the VMs do not
    orphan = root / "run" / "vm" / "0000000000000000"
    orphan.mkdir()
    (orphan / "qmp.sock").touch()
    os.kill(dead.pid, signal.SIGKILL)
    assert wait_for(lambda: not proc.is_alive(dead.pid, None))

    second = make()
    states = {v.sandbox_id: v for v in second.list(NoArgs()).vms}
    assert states["live"].state == "paused" and states["live"].pid == live.pid
    assert states["dead"].state == "stopped" and states["dead"].exit_status is None
    assert not orphan.exists()
    second.resume(SandboxRef(sandbox_id="live"))
    assert second.stop(StopVm(sandbox_id="live")).existed
    assert not proc.is_alive(live.pid, None)
    assert second.stop(StopVm(sandbox_id="dead")).existed
    assert list((root / "run" / "vm").iterdir()) == []


def test_adopted_vm_exit_is_noticed(env):
    config, backend, make, root = env
    first = make()
    info = first.create(CreateVm(sandbox_id="sb1"))
    first.close()
    second = make()
    os.kill(info.pid, signal.SIGKILL)
    assert wait_for(lambda: second.store.read("sb1", STATE_NAME, HypervisorState).state == "stopped")
    assert second.get(SandboxRef(sandbox_id="sb1")).exit_status is None


def test_keyed_locks_are_released():
    locks = KeyedLocks(timeout=0.1)
    with locks.hold("a"):
        assert len(locks) == 1
        with locks.hold("b"):
            assert len(locks) == 2
    assert len(locks) == 0


def test_parallel_creates(env):
    config, backend, make, root = env
    svc = make()
    results: dict[str, object] = {}

    def create(name: str, sid: str) -> None:
        try:
            results[name] = svc.create(CreateVm(sandbox_id=sid)).pid
        except Exception as exc:  # noqa: BLE001
            results[name] = exc

    threads = [threading.Thread(target=create, args=(f"t{i}", f"sb{i % 3}")) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    errors = [r for r in results.values() if isinstance(r, Exception)]
    assert len(errors) == 3 and all(isinstance(e, AlreadyExists) for e in errors)
    assert sorted(v.sandbox_id for v in svc.list(NoArgs()).vms) == ["sb0", "sb1", "sb2"]
    for sid in ("sb0", "sb1", "sb2"):
        assert svc.stop(StopVm(sandbox_id=sid)).existed
    assert len(backend.spawned) == 3


def test_release_kills_the_vm_at_once_and_its_directories_go_after(env):
    config, backend, make, root = env
    svc = make()
    info = svc.create(CreateVm(sandbox_id="sb1"))
    vm_dir = Path(info.agent_socket).parent
    assert svc.release(SandboxRef(sandbox_id="sb1")).existed
    assert not proc.is_alive(info.pid, None)  # killed and reaped before the reply
    assert not (config.sandboxes_dir / "sb1").exists()  # the id is free for a new container
    assert svc.drain(Drain(timeout_s=10)).pending == []
    assert not vm_dir.exists() and list((root / "run" / "releasing" / "vmmd").iterdir()) == []
    assert not svc.release(SandboxRef(sandbox_id="sb1")).existed  # idempotent


def test_a_new_vm_of_a_released_id_waits_for_the_release(env):
    config, backend, make, root = env
    svc = make()
    svc.releases.close()  # no worker: the create itself must finish the release
    first = svc.create(CreateVm(sandbox_id="sb1"))
    svc.release(SandboxRef(sandbox_id="sb1"))
    assert svc.releases.pending() == ["sb1"]
    second = svc.create(CreateVm(sandbox_id="sb1"))
    assert svc.releases.pending() == [] and second.pid != first.pid and Path(second.agent_socket).exists()
    svc.stop(StopVm(sandbox_id="sb1"))


def test_a_vmmd_killed_between_the_record_and_the_kill_finishes_at_start(env):
    config, backend, make, root = env
    first = make()
    info = first.create(CreateVm(sandbox_id="sb1"))
    first.close()
    # What vm.release has done when vmmd dies before the SIGKILL: the record is in the queue.
    first.releases.take(first.store.path("sb1", STATE_NAME), "sb1")
    assert proc.is_alive(info.pid, None)
    second = make()  # finishes the queue before it serves
    assert wait_for(lambda: not proc.is_alive(info.pid, None))
    assert second.releases.pending() == [] and not Path(info.agent_socket).parent.exists()
    assert second.list(NoArgs()).vms == []
