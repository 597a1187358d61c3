"""vmmd's VmService with the Firecracker backend, driven against the stand-in `firecracker`
(tests/helpers/fake_firecracker.py: it answers the API, boots nothing): what hypervisor.json
and VmInfo say (agent over hybrid vsock), disks reported with the serial the guest reads,
`auto` choosing QEMU where Firecracker cannot run, re-adoption by a restarted vmmd."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from hanabi_common.config import Config, VmmConfig
from hanabi_common.errors import AlreadyExists
from hanabi_common.models.base import SandboxRef
from hanabi_common.models.vmmd import AttachDisk, CreateVm, DetachDisk, StopVm
from hanabi_vmmd import proc
from hanabi_vmmd.accel import AccelDecision
from hanabi_vmmd.firecracker.backend import FirecrackerHypervisor
from hanabi_vmmd.firecracker.version import VersionCheck
from hanabi_vmmd.service import VmService
from hanabi_vmmd.state import STATE_NAME, HypervisorState

from tests.helpers import fake_firecracker


@pytest.fixture
def env(monkeypatch):
    root = Path(tempfile.mkdtemp(prefix="hfs"))
    fake = fake_firecracker.install(root)
    guest = root / "guest"
    guest.mkdir()
    (guest / "vmlinux").write_bytes(b"\x7fELF" + bytes(60))
    (guest / "initrd.img").write_bytes(b"i")
    monkeypatch.setenv("FAKE_FC_RECORD", str(root / "record.jsonl"))
    config = Config(run_dir=root / "run", vmm=VmmConfig(guest_dir=guest, stop_timeout_s=2))
    config.sandboxes_dir.mkdir(parents=True)
    services: list[VmService] = []

    def make(backends=None) -> VmService:
        backends = backends or {"firecracker": FirecrackerHypervisor(binary=str(fake), start_timeout=10)}
        service = VmService(config, backends=backends, accel=AccelDecision("kvm", "test"))
        services.append(service)
        return service

    yield config, make, root
    for service in services:
        service.close()
    shutil.rmtree(root, ignore_errors=True)


def test_create_reports_the_hybrid_vsock_agent_and_survives_a_vmmd_restart(env):
    config, make, root = env
    svc = make()
    info = svc.create(CreateVm(sandbox_id="sb1", hypervisor="firecracker", memory_mib=128))
    assert info.hypervisor == "firecracker" and info.state == "running"
    assert info.agent_transport == "hybrid_vsock" and info.agent_port == 1024
    assert info.agent_socket.endswith("/fc-vsock.sock") and info.control_socket.endswith("/fc.sock")
    state = svc.store.read("sb1", STATE_NAME, HypervisorState)
    assert state.agent_transport == "hybrid_vsock" and state.hotplug_slots == 4

    vol = root / "vol.img"
    vol.write_bytes(bytes(8192))
    disk = svc.devices.attach_disk(AttachDisk(sandbox_id="sb1", path=str(vol), serial="rootfs"))
    st = os.stat(vol)
    assert disk.serial == "rootfs" and disk.guest_serial == f"{st.st_dev}{st.st_rdev}{st.st_ino}"[:20]
    with pytest.raises(AlreadyExists):  # the guest could not tell the two apart
        svc.devices.attach_disk(AttachDisk(sandbox_id="sb1", path=str(vol), serial="again"))

    svc.pause(SandboxRef(sandbox_id="sb1"))
    svc.close()
    again = make()  # a restarted vmmd re-adopts the VM and asks Firecracker its state
    assert again.get(SandboxRef(sandbox_id="sb1")).state == "paused"
    again.resume(SandboxRef(sandbox_id="sb1"))
    again.devices.detach_disk(DetachDisk(sandbox_id="sb1", device_id=disk.device_id))
    pid = state.pid
    assert again.stop(StopVm(sandbox_id="sb1")).existed
    assert not proc.is_alive(pid, state.start_time)
    patches = [r for r in fake_firecracker.read_record(root / "record.jsonl") if r.get("method") == "PATCH"]
    assert [p["path"] for p in patches] == ["/drives/ph0", "/vm", "/vm", "/drives/ph0"]


def test_auto_takes_qemu_where_firecracker_cannot_run(env):
    config, make, root = env
    missing = FirecrackerHypervisor(version=VersionCheck("firecracker", problem="firecracker not on PATH"))
    svc = make({"firecracker": missing})
    with pytest.raises(Exception) as err:  # no qemu backend in this vmmd: it says so
        svc.create(CreateVm(sandbox_id="sb2", hypervisor="auto"))
    assert "'qemu' is not available" in str(err.value)
    assert svc._auto is not None and "firecracker not on PATH" in svc._auto.reason
