"""vmmd's VmService with the Firecracker backend, driven against the stand-in `firecracker`
(tests/helpers/fake_firecracker.py: it answers the API as v1.16.1's spec says, boots nothing,
its guest agent answers over hybrid vsock): what hypervisor.json and VmInfo say, disks reported
with the serial the guest reads, `auto` choosing QEMU where Firecracker cannot run, re-adoption
by a restarted vmmd; VM templates: built on first need, every VM without NICs a clone (the
exact API calls of both, checked against the spec), the `restored` request, a restart keeping
the template, a clone that cannot load booting cold, VMs with NICs booting cold, stale
templates removed with their image."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

from hanabi_common.config import Config, VmmConfig
from hanabi_common.errors import AlreadyExists
from hanabi_common.models.base import SandboxRef
from hanabi_common.models.vmmd import AttachDisk, CreateVm, DetachDisk, StopVm, VmNic
from hanabi_vmmd import proc
from hanabi_vmmd.accel import AccelDecision
from hanabi_vmmd.firecracker.backend import FirecrackerHypervisor
from hanabi_vmmd.firecracker.spec import load_spec
from hanabi_vmmd.firecracker.version import VersionCheck
from hanabi_vmmd.service import VmService
from hanabi_vmmd.state import STATE_NAME, HypervisorState

from tests.helpers import fake_firecracker
from tests.helpers.hanabi import processes_mentioning
from tests.helpers.firecracker_spec import spec_path_for, validate


@pytest.fixture
def env(monkeypatch, request):
    templates = getattr(request, "param", False)
    root = Path(tempfile.mkdtemp(prefix="hfs"))
    fake = fake_firecracker.install(root)
    guest = fake_firecracker.fake_guest(root / "guest")
    monkeypatch.setenv("FAKE_FC_RECORD", str(root / "record.jsonl"))
    # no spare VMMs: these tests count the Firecrackers started (test_firecracker_templates has spares)
    config = Config(run_dir=root / "run", vmm=VmmConfig(guest_dir=guest, stop_timeout_s=2, templates=templates,
                                                        boot_timeout_s=20, spare_vmms=0))
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
    for pid in processes_mentioning(str(root)):  # whatever a failed test left running
        os.kill(pid, signal.SIGKILL)
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


# -- VM templates ------------------------------------------------------------------------

templated = pytest.mark.parametrize("env", [True], indirect=True)


@pytest.fixture(scope="module")
def fc_spec() -> dict:
    return load_spec()


def by_process(root: Path) -> list[list[dict]]:
    """The stand-in's record split per Firecracker process, in start order: its API requests
    (GET / left out), its refusals and what its guest agent answered."""
    processes: dict[int, list[dict]] = {}
    for entry in fake_firecracker.read_record(root / "record.jsonl"):
        if "argv" in entry:
            processes[entry["pid"]] = []
        elif (entry.get("method"), entry.get("path")) != ("GET", "/"):
            processes[entry["pid"]].append(entry)
    return list(processes.values())


def calls(fc_spec: dict, entries: list[dict]) -> list[str]:
    """`METHOD PATH` of each API request (its body validated against the spec, strictly),
    `agent TYPE` of each request the guest agent answered."""
    out = []
    for e in entries:
        if "agent" in e:
            out.append(f"agent {e['agent']}")
        elif "refused" in e:
            out.append(f"refused {e['refused']}: {e['fault_message']}")
        else:
            validate(fc_spec, e["method"], spec_path_for(fc_spec, e["path"]), e["body"])
            out.append(f"{e['method']} {e['path']}")
    return out


BOOT = ["PUT /logger", "PUT /metrics", "PUT /boot-source", "PUT /machine-config", "PUT /drives/ph0",
        "PUT /drives/ph1", "PUT /drives/ph2", "PUT /drives/ph3", "PUT /vsock", "PUT /actions"]
TEMPLATE = BOOT + ["agent ping", "agent restored", "PATCH /vm", "PUT /snapshot/create"]
CLONE = ["PUT /logger", "PUT /metrics", "PUT /snapshot/load", "PATCH /drives/ph0", "PATCH /drives/ph1",
         "PATCH /drives/ph2", "PATCH /drives/ph3", "PATCH /vm", "agent restored"]


def body_of(entries: list[dict], method: str, path: str) -> dict:
    return next(e["body"] for e in entries if (e.get("method"), e.get("path")) == (method, path))


@templated
def test_a_firecracker_vm_is_a_clone_of_a_template_built_at_its_first_need(env, fc_spec):
    config, make, root = env
    svc = make()
    info = svc.create(CreateVm(sandbox_id="sb1", hypervisor="firecracker", memory_mib=128))
    assert info.state == "running" and info.agent_transport == "hybrid_vsock"
    state = svc.store.read("sb1", STATE_NAME, HypervisorState)
    (template,) = svc.templates.list()
    assert state.template == template.key and template.record.params["backend"] == "firecracker"
    template_calls, clone_calls = by_process(root)
    assert calls(fc_spec, template_calls) == TEMPLATE
    assert calls(fc_spec, clone_calls) == CLONE
    drives = config.run_dir / "templates" / "drives"
    assert body_of(template_calls, "PUT", "/drives/ph0")["path_on_host"] == str(drives / "ph0.img")
    assert body_of(template_calls, "PATCH", "/vm") == {"state": "Paused"}
    assert body_of(template_calls, "PUT", "/snapshot/create") == {
        "snapshot_path": str(svc.templates.build_dir(template.key) / "state"),
        "mem_file_path": str(svc.templates.build_dir(template.key) / "memory"), "snapshot_type": "Full"}
    assert body_of(clone_calls, "PUT", "/snapshot/load") == {
        "snapshot_path": str(template.state_file),
        "mem_backend": {"backend_type": "File", "backend_path": str(template.memory_file)},
        "resume_vm": False, "vsock_override": {"uds_path": info.agent_socket}}
    vm_dir = Path(state.vm_dir)
    assert body_of(clone_calls, "PATCH", "/drives/ph3") == {"drive_id": "ph3", "path_on_host": str(vm_dir / "ph3.img")}
    assert body_of(clone_calls, "PATCH", "/vm") == {"state": "Resumed"}
    assert processes_mentioning(str(config.run_dir / "templates")) == []  # the template VM ended
    assert sorted(p.name for p in template.dir.iterdir()) == ["memory", "state", "template.json"]

    svc.create(CreateVm(sandbox_id="sb2", hypervisor="firecracker", memory_mib=128))  # no second build
    assert [calls(fc_spec, p) for p in by_process(root)][2:] == [CLONE]
    pids = [svc.get(SandboxRef(sandbox_id=s)).pid for s in ("sb1", "sb2")]
    for sid in ("sb1", "sb2"):
        assert svc.stop(StopVm(sandbox_id=sid)).existed
    assert not any(proc.is_alive(pid, None) for pid in pids)
    assert processes_mentioning(str(root)) == []


@templated
def test_the_template_and_its_clones_survive_a_vmmd_restart(env, fc_spec):
    config, make, root = env
    svc = make()
    svc.create(CreateVm(sandbox_id="sb1", hypervisor="firecracker", memory_mib=128))
    key = svc.templates.list()[0].key
    svc.close()
    again = make()  # a restarted vmmd: the clone re-adopted, the template kept
    assert again.get(SandboxRef(sandbox_id="sb1")).state == "running"
    assert [t.key for t in again.templates.list()] == [key]
    again.create(CreateVm(sandbox_id="sb2", hypervisor="firecracker", memory_mib=128))
    assert [calls(fc_spec, p) for p in by_process(root)] == [TEMPLATE, CLONE, CLONE]
    assert again.store.read("sb2", STATE_NAME, HypervisorState).template == key
    for sid in ("sb1", "sb2"):
        again.stop(StopVm(sandbox_id=sid))
    assert processes_mentioning(str(root)) == []


@templated
def test_a_clone_that_cannot_load_boots_cold_with_one_log_line_and_its_template_goes(env, fc_spec, caplog):
    config, make, root = env
    svc = make()
    svc.create(CreateVm(sandbox_id="sb1", hypervisor="firecracker", memory_mib=128))
    shutil.rmtree(config.run_dir / "templates" / "drives")  # the drives its snapshot names
    caplog.set_level(logging.WARNING, logger="hanabi.vmmd")
    info = svc.create(CreateVm(sandbox_id="sb2", hypervisor="firecracker", memory_mib=128))
    assert info.state == "running"
    assert svc.store.read("sb2", STATE_NAME, HypervisorState).template is None
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "hanabi.vmmd"]
    assert [r.getMessage() for r in warnings] == [
        "clone did not start, booting cold (the template is rebuilt at its next use)"]
    assert "Unable to restore block device ph0" in warnings[0].__dict__["error"]
    failed_clone, cold = by_process(root)[2:]
    assert calls(fc_spec, failed_clone)[:3] == ["PUT /logger", "PUT /metrics", "PUT /snapshot/load"]
    assert calls(fc_spec, cold) == BOOT
    assert svc.templates.list() == []  # discarded: rebuilt at a use after the retry delay
    for sid in ("sb1", "sb2"):
        svc.stop(StopVm(sandbox_id=sid))
    assert processes_mentioning(str(root)) == []


@templated
def test_a_vm_with_a_nic_boots_cold_and_builds_no_template(env, fc_spec):
    config, make, root = env
    svc = make()
    nic = VmNic(tap="tap-x", mac="02:00:00:00:00:07")
    svc.create(CreateVm(sandbox_id="sb1", hypervisor="firecracker", memory_mib=128, nics=[nic]))
    (cold,) = by_process(root)
    assert calls(fc_spec, cold) == BOOT[:-2] + ["PUT /network-interfaces/eth0", "PUT /vsock", "PUT /actions"]
    assert svc.templates.list() == [] and svc.store.read("sb1", STATE_NAME, HypervisorState).template is None
    svc.stop(StopVm(sandbox_id="sb1"))


@templated
def test_an_agent_without_restored_makes_no_template_and_vms_boot_cold(env, fc_spec, monkeypatch):
    config, make, root = env
    monkeypatch.setenv("FAKE_FC_AGENT", "old")
    svc = make()
    svc.create(CreateVm(sandbox_id="sb1", hypervisor="firecracker", memory_mib=128))
    template_try, cold = by_process(root)
    # refused: not saved, the VM shut down (SendCtrlAltDel: it runs)
    assert calls(fc_spec, template_try) == BOOT + ["agent ping", "agent restored", "PUT /actions"]
    assert template_try[-1]["body"] == {"action_type": "SendCtrlAltDel"}
    assert calls(fc_spec, cold) == BOOT
    assert svc.templates.list() == [] and list((config.run_dir / "templates" / "build").iterdir()) == []
    svc.stop(StopVm(sandbox_id="sb1"))
    assert processes_mentioning(str(root)) == []


@templated
def test_a_new_guest_image_replaces_the_template_and_turning_templates_off_removes_them(env, fc_spec):
    config, make, root = env
    svc = make()
    svc.create(CreateVm(sandbox_id="sb1", hypervisor="firecracker", memory_mib=128))
    old = svc.templates.list()[0].key
    svc.stop(StopVm(sandbox_id="sb1"))
    (config.vmm.guest_dir / "initrd.img").write_bytes(b"a newer initrd")
    svc.create(CreateVm(sandbox_id="sb2", hypervisor="firecracker", memory_mib=128))
    (new,) = svc.templates.list()
    assert new.key != old and not (config.run_dir / "templates" / old).exists()
    svc.stop(StopVm(sandbox_id="sb2"))
    svc.close()
    config.vmm.templates = False
    make()
    assert not (config.run_dir / "templates" / new.key).exists()
    assert not (config.run_dir / "templates" / "drives").exists()
