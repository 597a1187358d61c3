"""hypervisor.json round trip and the short VM directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from hanabi_common.errors import FailedPrecondition
from hanabi_common.state import StateStore
from hanabi_vmmd.state import STATE_NAME, SUN_PATH_MAX, DiskRecord, HypervisorState, vm_dir_for


def make_state(sid: str = "sb1", run: Path = Path("/run/hanabi")) -> HypervisorState:
    vm_dir = vm_dir_for(run, sid)
    return HypervisorState(
        sandbox_id=sid, hypervisor="qemu", accel="tcg", machine="q35", hotplug_slots=4,
        state="running", pid=1234, start_time=99887, memory_mib=256, vcpus=1,
        vm_dir=str(vm_dir), agent_socket=str(vm_dir / "agent.sock"),
        control_socket=str(vm_dir / "qmp.sock"), console_log=str(vm_dir / "console.log"),
        stderr_log=str(vm_dir / "qemu.stderr"), created_at=1700000000.5,
        disks=[DiskRecord(device_id="disk-r0", node_name="blk-r0", serial="r0", path="/img",
                          bus="rp0", readonly=True)])


def test_round_trip(tmp_path):
    store = StateStore(tmp_path / "sbs")
    state = make_state()
    store.write("sb1", STATE_NAME, state)
    assert (tmp_path / "sbs" / "sb1" / "hypervisor.json").is_file()
    back = store.read("sb1", STATE_NAME, HypervisorState)
    assert back == state
    assert back.disk("disk-r0").bus == "rp0" and back.disk("nope") is None


def test_schema_version_mismatch_is_refused(tmp_path):
    store = StateStore(tmp_path)
    path = store.write("sb1", STATE_NAME, make_state())
    path.write_text(path.read_text().replace('"schema_version": 1', '"schema_version": 99'))
    with pytest.raises(FailedPrecondition):
        store.read("sb1", STATE_NAME, HypervisorState)


def test_info_and_handle():
    state = make_state()
    info = state.info()
    assert info.sandbox_id == "sb1" and info.pid == 1234 and info.state == "running"
    assert info.disks == ["disk-r0"] and info.agent_socket.endswith("/agent.sock")
    assert info.control_socket.endswith("/qmp.sock")
    handle = state.handle()
    assert handle.pid == 1234 and handle.start_time == 99887 and handle.process is None
    assert handle.machine == "q35" and handle.hotplug_slots == 4
    spec = state.disks[0].spec()
    assert spec.readonly and spec.node_name == "blk-r0" and spec.path == Path("/img")


def test_vm_dir_is_short_and_stable_for_long_ids():
    long_id = "a" * 128
    run = Path("/run/hanabi")
    first = vm_dir_for(run, long_id)
    assert first == vm_dir_for(run, long_id) != vm_dir_for(run, "a" * 127)
    assert first.parent == run / "vm" and len(first.name) == 16
    assert len(str(first / "agent.sock")) < SUN_PATH_MAX
